"""The packed artifact: a versioned container of quantized and passthrough tensors, never pickled.

Layout: MAGIC (8 bytes) | version u16 | header length u32 | header (UTF-8 JSON) | sections.
The header lists every section (offset, length, codec, crc32) and every tensor (name, shape, kind,
bits, the sections holding it). Quantized tensors keep int codes in [-qmax, qmax] and one fp16
scale per row; each code section is stored with whichever of rANS, bit packing + a general
compressor, or int8 + byte shuffle + a general compressor is smallest. Small float tensors go to one
fp16 group. Reading validates magic, version, lengths and checksums before decoding anything.
"""

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.io import write_bytes
from pgolf.quant.codec import (
    compress_best,
    decompress,
    pack_bits,
    rans_pack,
    rans_unpack,
    shuffle_bytes,
    unpack_bits,
    unshuffle_bytes,
)
from pgolf.quant.gptq import qmax

MAGIC = b"PGOLF\x00AR"
VERSION = 1
PREFIX = struct.Struct("<8sHI")


@dataclass
class Quantized:
    codes: torch.Tensor  # int8, (rows, cols)
    scales: torch.Tensor  # fp16, (rows,)
    bits: int


def encode_codes(codes: np.ndarray, bits: int) -> tuple[str, bytes]:
    """The smallest encoding of a code tensor (values in [-qmax, qmax])."""
    q = qmax(bits)
    symbols = codes.astype(np.int64).ravel() + q
    options = {"rans": rans_pack(symbols, 2 * q + 1)}
    name, blob = compress_best(pack_bits(symbols, bits))
    options[f"bits+{name}"] = blob
    name, blob = compress_best(codes.astype(np.int8).tobytes())
    options[f"int8+{name}"] = blob
    best = min(options, key=lambda k: len(options[k]))
    return best, options[best]


def decode_codes(codec: str, blob: bytes, bits: int, count: int) -> np.ndarray:
    q = qmax(bits)
    if codec == "rans":
        return (rans_unpack(blob) - q).astype(np.int8)
    layout, _, compressor = codec.partition("+")
    raw = decompress(compressor, blob)
    if layout == "bits":
        return (unpack_bits(raw, bits, count).astype(np.int64) - q).astype(np.int8)
    if layout == "int8":
        return np.frombuffer(raw, dtype=np.int8).copy()
    raise ValueError(f"unknown code codec {codec!r}")


class _Writer:
    def __init__(self):
        self.sections, self.payload = [], bytearray()

    def add(self, data: bytes, codec: str) -> int:
        self.sections.append({"offset": len(self.payload), "length": len(data), "codec": codec,
                              "crc32": zlib.crc32(data)})
        self.payload += data
        return len(self.sections) - 1


def pack_artifact(tensors: dict[str, Quantized | torch.Tensor], meta: dict) -> tuple[bytes, dict]:
    """Container bytes and a per-tensor byte breakdown."""
    w, table, breakdown = _Writer(), [], {}
    passthrough = [(n, t) for n, t in tensors.items() if not isinstance(t, Quantized)]
    for name, t in tensors.items():
        if isinstance(t, Quantized):
            codec, blob = encode_codes(t.codes.numpy(), t.bits)
            scale_codec, scale_blob = compress_best(shuffle_bytes(
                t.scales.to(torch.float16).numpy().tobytes(), 2))
            table.append({"name": name, "kind": "quantized", "shape": list(t.codes.shape),
                          "bits": t.bits, "codes": w.add(blob, codec),
                          "scales": w.add(scale_blob, scale_codec)})
            breakdown[name] = {"codes": len(blob), "scales": len(scale_blob), "codec": codec}
    if passthrough:
        raw = b"".join(t.detach().to(torch.float16).numpy().tobytes() for _, t in passthrough)
        codec, blob = compress_best(shuffle_bytes(raw, 2))
        section = w.add(blob, codec)
        for name, t in passthrough:
            table.append({"name": name, "kind": "fp16", "shape": list(t.shape),
                          "section": section})
        breakdown["fp16 group"] = {"bytes": len(blob), "tensors": len(passthrough),
                                   "codec": codec}
    header = json.dumps({"tensors": table, "sections": w.sections, "meta": meta},
                        separators=(",", ":")).encode()
    data = PREFIX.pack(MAGIC, VERSION, len(header)) + header + bytes(w.payload)
    breakdown["header"] = PREFIX.size + len(header)
    return data, breakdown


def write_artifact(path: Path, tensors: dict, meta: dict) -> dict:
    data, breakdown = pack_artifact(tensors, meta)
    write_bytes(path, data)
    return {"bytes": len(data), "breakdown": breakdown}


def _sections(path: Path, data: bytes) -> tuple[dict, list[bytes]]:
    if len(data) < PREFIX.size:
        raise ValueError(f"artifact {path}: {len(data)} bytes, shorter than its prefix")
    magic, version, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"artifact {path}: wrong magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"artifact {path}: unsupported version {version} (expected {VERSION})")
    start = PREFIX.size + header_len
    if start > len(data):
        raise ValueError(f"artifact {path}: header of {header_len} bytes runs past the file end")
    try:
        header = json.loads(data[PREFIX.size:start])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"artifact {path}: corrupt header ({err})") from None
    blobs = []
    for i, s in enumerate(header["sections"]):
        blob = data[start + s["offset"]:start + s["offset"] + s["length"]]
        if len(blob) != s["length"]:
            raise ValueError(f"artifact {path}: section {i} is truncated "
                             f"({len(blob)} of {s['length']} bytes)")
        if zlib.crc32(blob) != s["crc32"]:
            raise ValueError(f"artifact {path}: section {i} fails its checksum")
        blobs.append(blob)
    return header, blobs


def read_artifact(path: Path) -> tuple[dict[str, torch.Tensor | Quantized], dict]:
    """Every tensor of an artifact (quantized ones as codes + scales) and its meta."""
    path = Path(path)
    header, blobs = _sections(path, path.read_bytes())
    sections, out, fp16 = header["sections"], {}, {}
    for entry in header["tensors"]:
        shape = tuple(entry["shape"])
        if entry["kind"] == "quantized":
            count = int(np.prod(shape))
            codes = decode_codes(sections[entry["codes"]]["codec"], blobs[entry["codes"]],
                                 entry["bits"], count)
            scale_section = sections[entry["scales"]]
            scales = np.frombuffer(unshuffle_bytes(decompress(
                scale_section["codec"], blobs[entry["scales"]]), 2), dtype=np.float16)
            if codes.size != count or scales.size != shape[0]:
                raise ValueError(f"artifact {path}: {entry['name']} holds {codes.size} codes and "
                                 f"{scales.size} scales for shape {list(shape)}")
            out[entry["name"]] = Quantized(torch.from_numpy(codes.reshape(shape)),
                                           torch.from_numpy(scales.copy()), entry["bits"])
        else:
            fp16.setdefault(entry["section"], []).append((entry["name"], shape))
    for section, members in fp16.items():
        raw = np.frombuffer(unshuffle_bytes(decompress(sections[section]["codec"],
                                                       blobs[section]), 2), dtype=np.float16)
        offset = 0
        for name, shape in members:
            n = int(np.prod(shape))
            out[name] = torch.from_numpy(raw[offset:offset + n].reshape(shape).copy()).float()
            offset += n
        if offset != raw.size:
            raise ValueError(f"artifact {path}: fp16 group {section} has {raw.size - offset} "
                             "values left over")
    return out, header["meta"]
