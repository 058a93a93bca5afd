"""Byte codecs for quantized tensors: bit packing, byte shuffle, general compressors, the order-0
entropy bound, and an interleaved rANS coder with a per-tensor frequency table.

rANS (Duda 2013) with 32-bit states, 16-bit renormalisation and frequencies quantized to a total
of 2^PRECISION. `lanes` independent coders are interleaved (symbol i goes to lane i % lanes) and
advanced together with numpy, so the Python loop runs once per step of `lanes` symbols.
"""

import lzma
import struct

import brotli
import numpy as np
import zstandard

PRECISION = 14
RANS_LOW = 1 << 16  # states live in [2^16, 2^32)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2^bits, packed LSB first."""
    v = np.asarray(values, dtype=np.uint16)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if len(flat) < count * bits:
        raise ValueError(f"bit-packed payload holds {len(flat) // bits} values, expected {count}")
    planes = flat[:count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint16)


def shuffle_bytes(data: bytes, stride: int) -> bytes:
    """Byte k of every stride-byte element together (the records' fp16 trick); tail kept as is."""
    n = len(data) // stride * stride
    body = np.frombuffer(data[:n], dtype=np.uint8).reshape(-1, stride).T.tobytes()
    return body + data[n:]


def unshuffle_bytes(data: bytes, stride: int) -> bytes:
    n = len(data) // stride * stride
    body = np.frombuffer(data[:n], dtype=np.uint8).reshape(stride, -1).T.tobytes()
    return body + data[n:]


COMPRESSORS = {
    "raw": (lambda b: b, lambda b: b),
    "zstd": (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
             lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "brotli": (lambda b: brotli.compress(b, quality=11), brotli.decompress),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
}


def compress_best(data: bytes, names=("zstd", "brotli", "lzma")) -> tuple[str, bytes]:
    """The smallest of the given compressors' outputs (raw if none helps)."""
    best = ("raw", data)
    for name in names:
        out = COMPRESSORS[name][0](data)
        if len(out) < len(best[1]):
            best = (name, out)
    return best


def decompress(name: str, data: bytes) -> bytes:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}")
    return COMPRESSORS[name][1](data)


def entropy_bound_bytes(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of the symbols, in bytes: what no per-tensor static code beats."""
    counts = np.bincount(np.asarray(symbols).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def quantize_freqs(counts: np.ndarray, total: int = 1 << PRECISION) -> np.ndarray:
    """Frequencies summing to `total`, every present symbol at least 1, close to proportional."""
    present = counts > 0
    if present.sum() > total:
        raise ValueError(f"{int(present.sum())} symbols do not fit a frequency total of {total}")
    freqs = np.where(present, np.maximum(1, np.floor(counts / counts.sum() * total)), 0)
    freqs = freqs.astype(np.int64)
    while (excess := int(freqs.sum()) - total) != 0:
        # Take from (or give to) the most frequent symbols: the cheapest place for the error.
        order = np.argsort(-counts)
        step = -1 if excess > 0 else 1
        for s in order[:abs(excess)]:
            if freqs[s] + step >= 1:
                freqs[s] += step
    return freqs


def rans_encode(symbols: np.ndarray, freqs: np.ndarray, lanes: int) -> tuple[np.ndarray, bytes]:
    """Encode symbols (ints < len(freqs)) into (final lane states, 16-bit word stream)."""
    sym = np.asarray(symbols, dtype=np.int64)
    steps = -(-len(sym) // lanes)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    f64 = freqs.astype(np.uint64)
    grid = np.full(steps * lanes, -1, dtype=np.int64)
    grid[:len(sym)] = sym
    grid = grid.reshape(steps, lanes)
    x = np.full(lanes, RANS_LOW, dtype=np.uint64)
    blocks = []
    for t in range(steps - 1, -1, -1):  # rANS encodes backwards, so decoding runs forwards
        s = grid[t]
        live = s >= 0
        fs = np.where(live, f64[np.maximum(s, 0)], 1)
        limit = ((RANS_LOW >> PRECISION) << 16) * fs
        emit = live & (x >= limit)
        blocks.append((x[emit] & 0xFFFF).astype("<u2"))
        x = np.where(emit, x >> 16, x)
        cs = np.where(live, cum[np.maximum(s, 0)], 0)
        x = np.where(live, ((x // fs) << PRECISION) + (x % fs) + cs, x)
    words = np.concatenate(blocks[::-1]) if blocks else np.zeros(0, "<u2")
    return x.astype("<u4"), words.tobytes()


def rans_decode(states: np.ndarray, words: bytes, freqs: np.ndarray, count: int) -> np.ndarray:
    lanes = len(states)
    steps = -(-count // lanes)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    slot_to_sym = np.repeat(np.arange(len(freqs)), freqs)
    stream = np.frombuffer(words, dtype="<u2").astype(np.uint64)
    x, pos = states.astype(np.uint64), 0
    out = np.empty(steps * lanes, dtype=np.int64)
    for t in range(steps):
        live = np.arange(lanes) < count - t * lanes
        slot = x & ((1 << PRECISION) - 1)
        s = slot_to_sym[slot.astype(np.int64)]
        out[t * lanes:(t + 1) * lanes] = s
        x = np.where(live, freqs[s].astype(np.uint64) * (x >> PRECISION) + slot - cum[s], x)
        need = live & (x < RANS_LOW)
        n = int(need.sum())
        if pos + n > len(stream):
            raise ValueError("rANS stream is truncated or corrupt (it ends before the codes do)")
        x[need] = (x[need] << 16) | stream[pos:pos + n]
        pos += n
    if pos != len(stream) or not (x == RANS_LOW).all():
        raise ValueError("rANS stream is corrupt (state or length mismatch after decoding)")
    return out[:count]


def choose_lanes(count: int) -> int:
    """Enough lanes for numpy to pay off, few enough that 4-byte states stay negligible."""
    return int(min(4096, max(1, count // 2048)))


def rans_pack(symbols: np.ndarray, alphabet: int) -> bytes:
    """Self-describing rANS blob: count, lanes, alphabet, freqs (u16), states (u32), words."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    counts = np.bincount(symbols, minlength=alphabet)
    freqs = quantize_freqs(counts) if len(symbols) else np.zeros(alphabet, dtype=np.int64)
    lanes = choose_lanes(len(symbols))
    states, words = rans_encode(symbols, freqs, lanes) if len(symbols) else (
        np.zeros(0, "<u4"), b"")
    header = struct.pack("<III", len(symbols), lanes if len(symbols) else 0, alphabet)
    return header + freqs.astype("<u2").tobytes() + states.tobytes() + words


def rans_unpack(blob: bytes) -> np.ndarray:
    if len(blob) < 12:
        raise ValueError("rANS blob shorter than its header")
    count, lanes, alphabet = struct.unpack_from("<III", blob)
    freqs_end = 12 + 2 * alphabet
    states_end = freqs_end + 4 * lanes
    if len(blob) < states_end:
        raise ValueError("rANS blob is truncated in its tables")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    freqs = np.frombuffer(blob[12:freqs_end], "<u2").astype(np.int64)
    if freqs.sum() != 1 << PRECISION:
        raise ValueError("rANS frequency table is corrupt")
    states = np.frombuffer(blob[freqs_end:states_end], "<u4")
    return rans_decode(states, blob[states_end:], freqs, count)
