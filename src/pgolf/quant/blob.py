"""Self-describing blobs for the optional codecs: input checks, framing, and code matrices and
symbol streams through the artifact's coders, with every length validated before use."""

import struct
from collections.abc import Callable

import numpy as np
import torch

from pgolf.quant.codec import decode_tensor, encode_tensor, rans_pack, rans_unpack
from pgolf.quant.gptq import qmax


def check_inputs(W: torch.Tensor, H: torch.Tensor, *, bits: int, clip_sigmas: float) -> None:
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {list(W.shape)}")
    if tuple(H.shape) != (W.size(1), W.size(1)):
        raise ValueError(f"Hessian shape {list(H.shape)} does not match {W.size(1)} columns")
    qmax(bits)  # raises ValueError outside 2..8 bits
    if not clip_sigmas > 0:
        raise ValueError(f"clip_sigmas={clip_sigmas}: must be positive")


def check_shape(rows: int, cols: int) -> None:
    """A header's shape, before anything is allocated for it: 2^28 elements is far beyond any
    matrix that fits the 16 MB artifact, so more means a corrupt header."""
    if rows * cols > 1 << 28:
        raise ValueError(f"shape {rows} x {cols} is implausibly large (corrupt header?)")


def pack_matrix(codes: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[str, bytes]:
    """A 2-D code matrix (and its fp16 row scales) through the artifact's own tensor coder, so
    these sections cost what a plain quantized tensor of the same codes would."""
    patterns = None if scales is None else scales.to(torch.float16).numpy().view(np.uint16)
    return "tensor", encode_tensor(codes.numpy().astype(np.int64), patterns)[1]


def unpack_matrix(section: tuple[str, bytes], rows: int, cols: int, *, bits: int,
                  with_scales: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of `pack_matrix`: int8 codes and fp16 scales (None when none were stored)."""
    codec, blob = section
    if codec != "tensor":
        raise ValueError(f"code matrix section codec {codec!r}, expected 'tensor'")
    codes, patterns = decoded("code matrix", lambda: decode_tensor(blob, rows, cols))
    if codes.shape != (rows, cols) or (codes.size and np.abs(codes).max() > qmax(bits)):
        raise ValueError(f"code matrix section does not hold {rows} x {cols} int{bits} codes")
    if (patterns is not None) != with_scales or (with_scales and len(patterns) != rows):
        raise ValueError(f"code matrix section does not hold the {rows} row scales expected")
    scales = None
    if with_scales:
        scales = torch.from_numpy(np.asarray(patterns, dtype=np.uint16).view(np.float16).copy())
    return torch.from_numpy(codes.astype(np.int8)), scales


def decoded(what: str, decode: Callable):
    """Run a decoder on untrusted bytes, turning whatever it raises into a ValueError."""
    try:
        return decode()
    except ValueError as err:
        raise ValueError(f"{what} section is corrupt: {err}") from None
    except Exception as err:  # the codec's bit readers and numpy raise IndexError and the like
        raise ValueError(f"{what} section is corrupt ({type(err).__name__}: {err})") from None


def frame(magic: bytes, head: bytes, sections: list[tuple[str, bytes]]) -> bytes:
    """magic | head | u8 count | per section: u8 codec-name length, name, u32 length, data."""
    out = bytearray(magic + head + struct.pack("<B", len(sections)))
    for codec, data in sections:
        name = codec.encode("ascii")
        out += struct.pack("<B", len(name)) + name + struct.pack("<I", len(data)) + data
    return bytes(out)


def unframe(blob: bytes, magic: bytes,
            head: struct.Struct) -> tuple[tuple, list[tuple[str, bytes]]]:
    """Inverse of `frame`, validating the magic, every length and that nothing trails."""
    blob = bytes(blob)
    start = len(magic) + head.size
    if len(blob) < start + 1:
        raise ValueError(f"blob of {len(blob)} bytes is shorter than its {start + 1}-byte header")
    if blob[:len(magic)] != magic:
        raise ValueError(f"wrong magic {blob[:len(magic)]!r} (expected {magic!r})")
    values = head.unpack_from(blob, len(magic))
    count, pos, sections = blob[start], start + 1, []
    for i in range(count):
        if pos + 1 > len(blob) or pos + 1 + blob[pos] + 4 > len(blob):
            raise ValueError(f"blob is truncated in the header of section {i}")
        name_len = blob[pos]
        codec = blob[pos + 1:pos + 1 + name_len].decode("ascii", errors="replace")
        (length,) = struct.unpack_from("<I", blob, pos + 1 + name_len)
        pos += 5 + name_len
        if pos + length > len(blob):
            raise ValueError(f"section {i} is truncated ({len(blob) - pos} of {length} bytes)")
        sections.append((codec, blob[pos:pos + length]))
        pos += length
    if pos != len(blob):
        raise ValueError(f"{len(blob) - pos} unexpected bytes after the last section")
    return values, sections


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[str, bytes]:
    """Codes in [-qmax, qmax] of no particular shape: one rANS stream with one table."""
    q = qmax(bits)
    return "rans", rans_pack(codes.numpy().astype(np.int64).ravel() + q, 2 * q + 1)


def unpack_codes(codec: str, blob: bytes, bits: int, count: int) -> np.ndarray:
    if codec != "rans":
        raise ValueError(f"codes section codec {codec!r}, expected 'rans'")
    q = qmax(bits)
    return (unpack_symbols("codes", blob, 2 * q + 1, count) - q).astype(np.int8)


def unpack_symbols(what: str, blob: bytes, alphabet: int, count: int) -> np.ndarray:
    symbols = decoded(what, lambda: rans_unpack(blob))
    if symbols.size != count or (count and symbols.max() >= alphabet):
        raise ValueError(f"{what} section holds {symbols.size} symbols < {alphabet}, "
                         f"expected {count}")
    return symbols
