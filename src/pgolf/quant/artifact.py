"""The packed artifact: a versioned container of quantized and passthrough tensors, never pickled.

Layout (version 3): MAGIC (8 bytes) | version u16 | header length u32 | header crc32 u32 |
header: brotli-compressed UTF-8 JSON {"tensors": [[name, shape, bits or null], ...],
"lengths": [section bytes, ...], "fp16": "rans" (the fp16 group's coding) or null, "crc32": of all
sections, "meta": the caller's} | sections, back to back: one per quantized tensor, in the order
of "tensors", then the fp16 group.
Version 4 adds LQER corrections: the header's "lqer" and their sections after the fp16 group
(pgolf.quant.lqer, imported only where corrections are, so only then counted as code bytes).
Without corrections the artifact is version 3, byte for byte as before; both versions are read.
A quantized tensor (int codes in [-qmax, qmax], one fp16 scale per row) is coded alone by
codec.encode_tensor: context-modelled rANS over codes and scales (row references, row and column
classes, chosen per tensor by size), so quantized_bytes() is exactly its section's size and the
file is the sum of those, the fp16 group and the header. Passthrough float tensors go to one
fp16 group (codec.encode_floats: one rANS stream, a table of high bits per tensor or per row, low
bits as is). A tensor stored by an optional codec (pack.matrix_codec: freezedry or sparse24) is
listed as [name, shape, bits, codec] and its section is that module's self-describing blob; the
module is imported only to read such a tensor, so an artifact without one needs none of its code
(and counts none of it as code bytes).
Reading checks magic, version, header length and checksum, section lengths and checksum before
decoding anything; damage raises ValueError naming the file.
"""

import importlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import brotli
import numpy as np
import torch

from pgolf.io import write_bytes
from pgolf.quant.codec import (
    decode_floats,
    decode_tensor,
    decode_tensors,
    decompress,
    encode_floats,
    encode_tensor,
    qmax,
)

OPTIONAL_CODECS = {"freezedry": "pgolf.quant.freezedry", "sparse24": "pgolf.quant.sparse24"}
LQER_MODULE = "pgolf.quant.lqer"
MAGIC = b"PGOLF\x00AR"
VERSION = 4  # the newest; written only when some tensor carries an LQER correction
VERSIONS = (3, 4)
PREFIX = struct.Struct("<8sHII")


@dataclass
class Quantized:
    codes: torch.Tensor  # int8, (rows, cols)
    scales: torch.Tensor  # fp16, (rows,)
    bits: int
    lqer: object = None  # an lqer.LowRank correction added on dequantizing, or None

    def dequantize(self) -> torch.Tensor:
        W = self.codes.float() * self.scales.float()[:, None]
        return W if self.lqer is None else W + self.lqer.dequantize().view(W.shape)


@dataclass
class Encoded:
    """A tensor stored by an optional codec: its module's pack() bytes, read back dequantized."""
    codec: str
    shape: tuple
    bits: int
    blob: bytes


def _grid(shape) -> tuple[int, int]:
    """(rows, everything else) of a tensor shape: one scale per row."""
    return (shape[0] if len(shape) else 1), int(np.prod(shape[1:], dtype=np.int64))


def _matrix(codes, bits: int) -> np.ndarray:
    """Codes as an int64 (rows, everything else) matrix, checked against the bit width."""
    codes = np.asarray(codes)
    matrix = codes.astype(np.int64).reshape(_grid(codes.shape))
    q = qmax(bits)
    if matrix.size and np.abs(matrix).max() > q:
        raise ValueError(f"codes reach {int(np.abs(matrix).max())}, outside int{bits}'s "
                         f"[-{q}, {q}]")
    return matrix


def _patterns(scales, rows: int) -> np.ndarray:
    patterns = np.asarray(scales, dtype=np.float16).ravel().view(np.uint16)
    if len(patterns) != rows:
        raise ValueError(f"{len(patterns)} scales for {rows} rows of codes")
    return patterns


def encode_codes(codes: np.ndarray, bits: int) -> tuple[str, bytes]:
    """(model name, bytes) of a code tensor alone, as the artifact codes it (without scales)."""
    return encode_tensor(_matrix(codes, bits))[:2]


def _int8(codes: np.ndarray, shape, bits: int) -> np.ndarray:
    _matrix(codes, bits)  # a corrupt stream can decode to values outside the grid
    return codes.astype(np.int8).reshape(shape)


def decode_codes(blob: bytes, shape, bits: int) -> np.ndarray:
    """int8 codes of `shape` from encode_codes' bytes."""
    return _int8(decode_tensor(blob, *_grid(tuple(shape)))[0], tuple(shape), bits)


def _encode(codes, scales, bits: int) -> tuple[str, bytes, int]:
    """A quantized tensor's section: (model name, bytes, bytes attributed to the scales)."""
    matrix = _matrix(codes, bits)
    return encode_tensor(matrix, _patterns(scales, len(matrix)))


def quantized_bytes(codes: np.ndarray, scales: np.ndarray, bits: int) -> int:
    """Bytes one quantized tensor's section takes in the artifact (codes and scales): exact, as
    every quantized tensor is coded on its own; the artifact adds only the shared header."""
    return len(_encode(codes, scales, bits)[1])


def pack_artifact(tensors: dict[str, Quantized | torch.Tensor], meta: dict) -> tuple[bytes, dict]:
    """Container bytes and a per-tensor byte breakdown. A quantized tensor's "scales" bytes are
    the coder's estimate of its scales' share of the tensor's section, "codes" the rest."""
    entries, payload, breakdown = [], [], {}
    for name, t in tensors.items():
        if isinstance(t, Quantized):
            codec, blob, scale_bytes = _encode(t.codes.numpy(), t.scales.to(torch.float16).numpy(),
                                               t.bits)
            entries.append([name, list(t.codes.shape), t.bits])
            payload.append(blob)
            breakdown[name] = {"codes": len(blob) - scale_bytes, "scales": scale_bytes,
                               "codec": codec}
        elif isinstance(t, Encoded):
            entries.append([name, list(t.shape), t.bits, t.codec])
            payload.append(t.blob)
            breakdown[name] = {"codes": len(t.blob), "scales": 0, "codec": t.codec}
    passthrough = [(n, t) for n, t in tensors.items() if not isinstance(t, Quantized | Encoded)]
    fp16_codec = None
    if passthrough:
        fp16_codec, blob = "rans", encode_floats([
            t.detach().to(torch.float16).numpy().view(np.uint16).reshape(_rows(t.shape))
            for _, t in passthrough])
        entries += [[n, list(t.shape), None] for n, t in passthrough]
        payload.append(blob)
        breakdown["fp16 group"] = {"bytes": len(blob), "tensors": len(passthrough),
                                   "codec": fp16_codec}
    corrections = []
    if any(isinstance(t, Quantized) and t.lqer is not None for t in tensors.values()):
        corrections = importlib.import_module(LQER_MODULE).pack_sections(tensors, payload,
                                                                         breakdown)
    body = b"".join(payload)
    fields = {"tensors": entries, "lengths": [len(b) for b in payload], "fp16": fp16_codec,
              "crc32": zlib.crc32(body), "meta": meta}
    if corrections:
        fields["lqer"] = corrections
    header = brotli.compress(json.dumps(fields, separators=(",", ":")).encode(), quality=11)
    version = VERSION if corrections else 3
    data = PREFIX.pack(MAGIC, version, len(header), zlib.crc32(header)) + header
    breakdown["header"] = len(data)
    return data + body, breakdown


def write_artifact(path: Path, tensors: dict, meta: dict) -> dict:
    data, breakdown = pack_artifact(tensors, meta)
    write_bytes(path, data)
    return {"bytes": len(data), "breakdown": breakdown}


def _header(path: Path, data: bytes) -> tuple[dict, int]:
    """The checked, parsed header and where the sections start."""
    if len(data) < PREFIX.size:
        raise ValueError(f"artifact {path}: {len(data)} bytes, shorter than its prefix")
    magic, version, header_len, crc = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"artifact {path}: wrong magic {magic!r} (expected {MAGIC!r})")
    if version not in VERSIONS:
        raise ValueError(f"artifact {path}: unsupported version {version} (expected one of "
                         f"{VERSIONS})")
    start = PREFIX.size + header_len
    if start > len(data):
        raise ValueError(f"artifact {path}: header of {header_len} bytes runs past the file end")
    if zlib.crc32(data[PREFIX.size:start]) != crc:
        raise ValueError(f"artifact {path}: header fails its checksum")
    try:
        header = json.loads(decompress("brotli", data[PREFIX.size:start]))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"artifact {path}: corrupt header ({err})") from None
    if not _well_formed(header) or not ("lqer" not in header if version == 3 else
                                        importlib.import_module(LQER_MODULE).well_formed(header)):
        raise ValueError(f"artifact {path}: header does not list tensors, lengths, fp16, crc32 "
                         f"and meta (and lqer) as version {version} does")
    header.setdefault("lqer", [])
    return header, start


def _well_formed(header) -> bool:
    def count(n):
        return isinstance(n, int) and n >= 0

    def entry(e):
        return (isinstance(e, list) and (len(e) == 3 or len(e) == 4 and e[3] in OPTIONAL_CODECS)
                and isinstance(e[0], str)
                and isinstance(e[1], list) and all(map(count, e[1]))
                and (e[2] is None or isinstance(e[2], int)))

    return (isinstance(header, dict) and "meta" in header and count(header.get("crc32"))
            and isinstance(header.get("fp16", 0), str | None)
            and isinstance(header.get("tensors"), list) and all(map(entry, header["tensors"]))
            and isinstance(header.get("lengths"), list) and all(map(count, header["lengths"])))


def _sections(path: Path, data: bytes) -> tuple[dict, list[bytes]]:
    """The header and the section bytes, after checking their lengths and checksum."""
    header, start = _header(path, data)
    body, lengths = data[start:], header["lengths"]
    quantized = sum(entry[2] is not None for entry in header["tensors"])
    if len(lengths) != quantized + (header["fp16"] is not None) + len(header["lqer"]):
        raise ValueError(f"artifact {path}: {len(lengths)} sections for {quantized} quantized "
                         f"tensors, the fp16 group and {len(header['lqer'])} LQER corrections")
    if sum(lengths) != len(body):
        raise ValueError(f"artifact {path}: sections hold {len(body)} bytes, the header lists "
                         f"{sum(lengths)} (truncated or padded)")
    if zlib.crc32(body) != header["crc32"]:
        raise ValueError(f"artifact {path}: sections fail their checksum")
    ends = np.cumsum(lengths).tolist()
    return header, [body[end - n:end] for n, end in zip(lengths, ends, strict=True)]


def _decode_quantized(entries: list, blobs: list[bytes]) -> dict[str, Quantized]:
    """Every quantized tensor, their sections decoded together (one rANS loop for all)."""
    decoded = decode_tensors([(blob, *_grid(shape)) for (_, shape, _), blob in zip(
        entries, blobs, strict=True)])
    out = {}
    for (name, shape, bits), (codes, patterns) in zip(entries, decoded, strict=True):
        if patterns is None:
            raise ValueError(f"{name}: its section holds no scales")
        out[name] = Quantized(torch.from_numpy(_int8(codes, shape, bits)),
                              torch.from_numpy(patterns.astype(np.uint16).view(np.float16)), bits)
    return out


def _rows(shape) -> tuple[int, int]:
    """(rows, cols) a passthrough tensor is coded as: a vector is one row."""
    return _grid(shape) if len(shape) > 1 else (1, int(np.prod(shape, dtype=np.int64)))


def _decode_fp16(members: list, blob: bytes, codec: str) -> dict[str, torch.Tensor]:
    if codec != "rans":
        raise ValueError(f"fp16 group coded as {codec!r}, not rans")
    values = decode_floats(blob, [_rows(shape) for _, shape, _ in members])
    return {name: torch.from_numpy(v.astype(np.uint16).view(np.float16).reshape(shape)).float()
            for (name, shape, _), v in zip(members, values, strict=True)}


def _decode_optional(entry: list, blob: bytes) -> torch.Tensor:
    name, shape, _, codec = entry
    module = importlib.import_module(OPTIONAL_CODECS[codec])
    W = module.dequantize(module.unpack(blob))
    if list(W.shape) != shape:
        raise ValueError(f"{name}: its {codec} section holds shape {list(W.shape)}, not {shape}")
    return W


def read_artifact(path: Path) -> tuple[dict[str, torch.Tensor | Quantized], dict]:
    """Every tensor of an artifact (quantized ones as codes + scales, optional-codec ones
    dequantized) and its meta."""
    path = Path(path)
    header, blobs = _sections(path, path.read_bytes())
    try:
        quantized = [e for e in header["tensors"] if e[2] is not None]
        sections = list(zip(quantized, blobs, strict=False))
        plain = [(e, b) for e, b in sections if len(e) == 3]
        out = _decode_quantized([e for e, _ in plain], [b for _, b in plain])
        out.update({e[0]: _decode_optional(e, b) for e, b in sections if len(e) == 4})
        rest = blobs[len(quantized):]
        if header["fp16"] is not None:
            out.update(_decode_fp16([e for e in header["tensors"] if e[2] is None], rest[0],
                                    header["fp16"]))
            rest = rest[1:]
        if header["lqer"]:
            importlib.import_module(LQER_MODULE).attach(header["lqer"], rest, out)
        return {e[0]: out[e[0]] for e in header["tensors"]}, header["meta"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"artifact {path}: corrupt content ({type(err).__name__}: {err})") \
            from None


def dequantize_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    """The float32 weights an artifact's tensors stand for."""
    return {n: t.dequantize() if isinstance(t, Quantized) else t.float()
            for n, t in tensors.items()}
