"""Byte codecs for quantized tensors: context-modelled rANS, byte shuffle, general compressors.

A quantized tensor (int codes, rows x cols, one fp16 scale per row) is one section: the length
of a bit header, the bit header (side information, frequency tables), rANS lane states, words.
The model is chosen per tensor by its estimated size, so each part only appears where it pays:
- row references: a row may be coded as its difference from k/4 times an earlier row (of the
  WINDOW before it, the one with the largest cos^2; |k| <= 8), which near-duplicate or
  correlated rows (an embedding's rarely trained tokens) cost little as; the reference's index
  is stored in bitlen(row - 1) bits, k goes through rANS with its own table;
- contexts: each code is coded with the table of (reference row or not, row class, column
  class); classes are equal-count bins of the rows' and columns' mean |code|, so columns of
  very different spread get tables of their own;
- scales: each fp16 scale's high bits go through rANS with their own table, its low bits (close
  to uniform) ride in the lanes' initial states (see rans_encode) or the bit header.
Passthrough fp16 tensors (encode_floats) are one stream coded like scales: a table of high bits
per tensor, or per row where rows differ; values as float_keys, so both signs share one table.
Tables hold levels in quarter-bit steps of log2 frequency, coded as first or second differences
with Exp-Golomb codes; frequencies are rebuilt from levels with integer arithmetic only, so every
machine decodes the same tables. rans_pack/rans_unpack code a plain symbol stream the same way.

rANS (Duda 2013) with 32-bit states, 16-bit renormalisation and frequencies quantized to a total
of 2^PRECISION. A stream's symbols are interleaved over independent lanes (symbol i goes to lane
i % lanes) advanced together with numpy; the decoder advances the lanes of many streams (every
tensor of an artifact) in the same step, so its Python loop runs about STEPS times a batch.
"""

import lzma
from collections.abc import Callable
from dataclasses import dataclass

import brotli
import numpy as np
import zstandard

PRECISION = 14
TOTAL = 1 << PRECISION
RANS_LOW = 1 << 16  # states live in [2^16, 2^32)
STEPS = 4096  # lanes = ceil(symbols / STEPS): about a byte per lane against Python loop steps
BATCH, BATCH_TABLES = 1 << 24, 1024  # decoded together at most (bounds the decoder's memory)
LEVEL_MAX = 63  # table levels 1..63 in quarter-bit steps; 0 marks an absent symbol
MANTISSAS = np.array([4096, 4871, 5793, 6889])  # round(4096 * 2^(j/4)), integers on purpose
MAX_ROW_KINDS, MAX_COL_KINDS, MAX_CONTEXTS = 8, 16, 64


def qmax(bits: int) -> int:
    """Largest code of the symmetric `bits`-bit grid: codes live in [-qmax, qmax]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: quantization supports 2..8 bits")
    return 2 ** (bits - 1) - 1


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
    try:
        return COMPRESSORS[name][1](data)
    except (brotli.error, lzma.LZMAError, zstandard.ZstdError) as err:
        raise ValueError(f"corrupt {name} stream ({err})") from None


def entropy_bound_bytes(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of the symbols, in bytes: what no per-tensor static code beats."""
    counts = np.bincount(np.asarray(symbols).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


# --- bit fields -----------------------------------------------------------------------------

def zigzag(v):
    v = np.asarray(v, dtype=np.int64)
    return np.where(v < 0, -2 * v - 1, 2 * v)


def golomb_lengths(values, k: int) -> np.ndarray:
    """Bits of each value's Exp-Golomb code of order k: v + 2^k in 2 * bitlen - 1 - k bits."""
    return 2 * np.frexp(np.asarray(values, dtype=np.int64) + (1 << k))[1] - 1 - k


def to_bits(values, width: int) -> str:
    """Non-negative ints as MSB-first `width`-bit fields, as '0'/'1' text."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if not width or not v.size:
        return ""
    assert v.min() >= 0 and v.max() >> width == 0, (v.min(), v.max(), width)
    bits = (v[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return (bits.astype(np.uint8) + 48).tobytes().decode()


def from_bits(text: str, count: int, width: int) -> np.ndarray:
    if not count or not width:
        return np.zeros(count, dtype=np.int64)
    bits = np.frombuffer(text.encode(), dtype=np.uint8) - 48
    return bits.reshape(count, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


class BitWriter:
    """MSB-first bit fields, collected as '0'/'1' text: headers and tables are small."""

    def __init__(self):
        self.parts: list[str] = []

    def fixed(self, values, width: int) -> None:
        self.parts.append(to_bits(values, width))

    def golomb(self, values, k: int) -> None:
        v = np.asarray(values, dtype=np.int64).ravel()
        for u, n in zip((v + (1 << k)).tolist(), golomb_lengths(v, k).tolist(), strict=True):
            self.parts.append(format(u, f"0{n}b"))

    def getvalue(self) -> bytes:
        text = "".join(self.parts)
        text += "0" * (-len(text) % 8)
        return int(text, 2).to_bytes(len(text) // 8, "big") if text else b""


class BitReader:
    def __init__(self, data: bytes):
        self.text = (np.unpackbits(np.frombuffer(data, dtype=np.uint8)) + 48).tobytes().decode()
        self.pos = 0

    def take(self, n: int) -> str:
        if self.pos + n > len(self.text):
            raise ValueError("code section is truncated or corrupt (its bit header runs out)")
        self.pos += n
        return self.text[self.pos - n:self.pos]

    def fixed(self, count: int, width: int) -> np.ndarray:
        return from_bits(self.take(count * width), count, width)

    def golomb(self, count: int, k: int) -> np.ndarray:
        out = []
        for _ in range(count):
            one = self.text.find("1", self.pos)
            if one < 0:
                raise ValueError("code section is truncated or corrupt (its bit header runs out)")
            zeros = one - self.pos
            self.pos = one
            out.append(int(self.take(zeros + 1 + k), 2) - (1 << k))
        return np.array(out, dtype=np.int64)


def write_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int = 0) -> tuple[int, int]:
    n = shift = 0
    while pos < len(data) and shift < 64:
        n |= (data[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not data[pos - 1] & 0x80:
            return n, pos
    raise ValueError("code section is truncated or corrupt (bad length prefix)")


# --- frequency tables -----------------------------------------------------------------------

def count_levels(counts: np.ndarray) -> np.ndarray:
    """Per table (row): each present symbol's log2 frequency relative to the table's most
    frequent one, in quarter bits from LEVEL_MAX down (at least 1); 0 for absent symbols."""
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.log2(c.max(axis=1, keepdims=True) / c)
        levels = np.clip(LEVEL_MAX - np.round(4 * rel), 1, LEVEL_MAX)
    return np.where(counts > 0, levels, 0).astype(np.int64)


def level_freqs(levels: np.ndarray) -> np.ndarray:
    """Frequencies summing to TOTAL per used table, every present symbol at least 1."""
    weights = np.where(levels > 0, MANTISSAS[levels % 4] << (levels // 4), 0)
    sums = weights.sum(axis=1, keepdims=True)
    freqs = np.where(weights > 0, np.maximum(1, weights * TOTAL // np.maximum(sums, 1)), 0)
    used = np.nonzero(sums[:, 0])[0]
    top = np.argmax(freqs[used], axis=1)
    short = TOTAL - freqs[used].sum(axis=1)
    fits = freqs[used, top] + short >= 1
    freqs[used[fits], top[fits]] += short[fits]  # the usual case: rounding down left a deficit
    for t in used[~fits]:  # many rare symbols floored up to 1: take the excess from the largest
        excess = int(freqs[t].sum()) - TOTAL
        for s in np.argsort(-freqs[t], kind="stable"):
            take = min(excess, int(freqs[t, s]) - 1)
            freqs[t, s] -= take
            excess -= take
    return freqs


def _table_fields(levels: np.ndarray) -> tuple[int, int, int, int, np.ndarray, int]:
    """(first present symbol, span, difference order, Exp-Golomb order, zigzagged residuals,
    bits) of one table. Order 2 predicts each level by extending the last step: the shapes are
    smooth."""
    present = np.nonzero(levels)[0]
    lo, hi = int(present[0]), int(present[-1])
    steps = np.diff(levels[lo:hi + 1])
    residuals = [zigzag(steps), zigzag(np.diff(steps, prepend=0))]
    ks = np.arange(4)[:, None]
    cost = np.array([golomb_lengths(r[None, :], ks).sum(axis=1) for r in residuals])
    order, k = np.unravel_index(np.argmin(cost), cost.shape)
    bits = 1 + int(golomb_lengths([lo, hi - lo], 2).sum()) + 9 + int(cost[order, k])
    return lo, hi - lo, int(order) + 1, int(k), residuals[order], bits


def table_bits(levels: np.ndarray) -> int:
    """Bits write_tables spends on these tables."""
    return sum(_table_fields(row)[-1] if row.any() else 1 for row in levels)


def write_tables(w: BitWriter, levels: np.ndarray) -> None:
    for row in levels:
        w.fixed([row.any()], 1)
        if row.any():
            lo, span, order, k, residuals, _ = _table_fields(row)
            w.golomb([lo, span], 2)
            w.fixed([order - 1], 1)
            w.fixed([k], 2)
            w.fixed([row[lo]], 6)
            w.golomb(residuals, k)


def read_tables(r: BitReader, count: int) -> np.ndarray:
    rows = []
    for _ in range(count):
        if not r.fixed(1, 1)[0]:
            rows.append(np.zeros(0, dtype=np.int64))
            continue
        lo, span = r.golomb(2, 2)
        if lo + span >= TOTAL:
            raise ValueError("code section is corrupt (frequency table wider than allowed)")
        order, k, first = int(r.fixed(1, 1)[0]) + 1, int(r.fixed(1, 2)[0]), r.fixed(1, 6)
        steps = r.golomb(int(span), k)
        steps = (steps >> 1) ^ -(steps & 1)
        for _ in range(order):
            steps = np.cumsum(steps)
        body = np.concatenate([first, first + steps])
        if body.min() < 0 or body.max() > LEVEL_MAX or not body[0] or not body[-1]:
            raise ValueError("code section is corrupt (bad frequency table)")
        rows.append(np.concatenate([np.zeros(lo, dtype=np.int64), body]))
    width = max([len(row) for row in rows] + [1])
    return np.array([np.pad(row, (0, width - len(row))) for row in rows], dtype=np.int64)


# --- rANS -----------------------------------------------------------------------------------

def choose_lanes(count: int) -> int:
    return max(1, -(-count // STEPS))


PAYLOAD_BITS = 31  # raw bits a lane's initial state carries: it starts at 2^31 + payload


def carried_bits(lanes: int, available: int) -> int:
    """How many of `available` raw bits the lanes' initial states carry (whole lanes only)."""
    return PAYLOAD_BITS * min(lanes, available // PAYLOAD_BITS)


def rans_encode(freq: np.ndarray, cum: np.ndarray, lanes: int,
                payload: str = "") -> tuple[bytes, bytes]:
    """Encode symbols given as (frequency, cumulative frequency) pairs, in decoding order.
    Returns (final lane states, 16-bit word stream). A lane starting at RANS_LOW wastes ~16 bits
    of its final state, so the first lanes start at 2^31 + 31 payload bits instead (payload:
    carried_bits of '0'/'1' text), which the decoder gets back as its final states."""
    steps = -(-len(freq) // lanes)
    pad = steps * lanes - len(freq)
    # Padding symbols have frequency TOTAL: they leave a state unchanged and never renormalise.
    f = np.concatenate([freq, np.full(pad, TOTAL)]).astype(np.uint64).reshape(steps, lanes)
    c = np.concatenate([cum, np.zeros(pad)]).astype(np.uint64).reshape(steps, lanes)
    limit = f << np.uint64(32 - PRECISION)
    x = np.full(lanes, RANS_LOW, dtype=np.uint64)
    carried = len(payload) // PAYLOAD_BITS
    x[:carried] = from_bits(payload, carried, PAYLOAD_BITS) + (1 << PAYLOAD_BITS)
    blocks = []
    for t in range(steps - 1, -1, -1):  # rANS encodes backwards, so decoding runs forwards
        emit = x >= limit[t]
        blocks.append(x[emit])
        x = np.where(emit, x >> np.uint64(16), x)
        x = ((x // f[t]) << np.uint64(PRECISION)) + x % f[t] + c[t]
    words = np.concatenate(blocks[::-1]) if blocks else np.zeros(0, dtype=np.uint64)
    return x.astype("<u4").tobytes(), (words & np.uint64(0xFFFF)).astype("<u2").tobytes()


def slot_tables(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (table, slot): symbol, its frequency, slot - its cumulative frequency. An identity
    table (one symbol of frequency TOTAL) is appended for the padding."""
    freqs = np.concatenate([freqs, np.zeros((1, freqs.shape[1]), dtype=np.int64)])
    freqs[freqs.sum(axis=1) == 0, 0] = TOTAL  # the identity table, and unused ones alike
    tables, alphabet = freqs.shape
    symbol = np.repeat(np.tile(np.arange(alphabet), tables), freqs.ravel())
    table = np.repeat(np.arange(tables), TOTAL)
    cum = np.cumsum(freqs, axis=1) - freqs
    slot = np.tile(np.arange(TOTAL), tables)
    return (symbol.astype(np.int16), freqs[table, symbol].astype(np.uint16),
            (slot - cum[table, symbol]).astype(np.uint16))


@dataclass
class Stream:
    """One rANS stream to decode: rans_encode's output, the table of each symbol (a row of
    freqs) and how many payload bits its lanes carry."""
    states: bytes
    words: bytes
    tables: np.ndarray
    freqs: np.ndarray
    carried: int = 0


def _lane_grid(streams: list[Stream], steps: int) -> tuple[np.ndarray, tuple]:
    """Slot-table base (table * TOTAL) per (step, lane) over all streams' lanes side by side,
    and the streams' slot tables concatenated."""
    parts = [slot_tables(s.freqs) for s in streams]
    first = np.cumsum([0] + [len(p[0]) // TOTAL for p in parts])
    base = np.empty((steps, sum(len(s.states) // 4 for s in streams)), dtype=np.int32)
    col = 0
    for s, table0 in zip(streams, first[:-1], strict=True):
        lanes = len(s.states) // 4
        grid = np.full(steps * lanes, table0 + len(s.freqs))  # padding: the identity table
        grid[:len(s.tables)] = s.tables + table0
        base[:, col:col + lanes] = grid.reshape(steps, lanes) * TOTAL
        col += lanes
    return base, tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def rans_decode(streams: list[Stream]) -> list[tuple[np.ndarray, str]]:
    """(symbols, carried payload bits) of each stream. All streams' lanes advance in the same
    numpy step, so the Python loop runs as often as the longest stream has steps, however many
    streams (tensors) there are."""
    lanes = np.array([len(s.states) // 4 for s in streams])
    steps = max([-(-len(s.tables) // n) for s, n in zip(streams, lanes, strict=True)] + [0])
    base, (symbol, freq, offset) = _lane_grid(streams, steps)
    owner = np.repeat(np.arange(len(streams)), lanes)  # the stream each lane belongs to
    words = np.concatenate([np.frombuffer(s.words, dtype="<u2") for s in streams] + [
        np.zeros(0, dtype="<u2")]).astype(np.uint32)
    ends = np.cumsum([len(s.words) // 2 for s in streams])
    pos = ends - [len(s.words) // 2 for s in streams]
    x = np.concatenate([np.frombuffer(s.states, dtype="<u4") for s in streams]).astype(np.uint32)
    out = np.empty(base.shape, dtype=np.int16)
    for t in range(steps):
        slot = base[t] + (x & (TOTAL - 1))
        out[t] = symbol[slot]
        x = freq[slot] * (x >> PRECISION) + offset[slot]
        need = np.flatnonzero(x < RANS_LOW)
        if need.size:
            who = owner[need]  # ascending: each stream's lanes read its words in lane order
            at = pos[who] + np.arange(need.size) - np.searchsorted(who, who)
            if (at >= ends[who]).any():
                raise ValueError("rANS stream is truncated or corrupt (it ends before the codes "
                                 "do)")
            x[need] = (x[need] << 16) | words[at]
            pos += np.bincount(who, minlength=len(streams))
    results, col = [], 0
    for s, n, left in zip(streams, lanes, ends - pos, strict=True):
        results.append(_finish_stream(s, out[:, col:col + n], x[col:col + n], left))
        col += n
    return results


def _finish_stream(s: Stream, out: np.ndarray, x: np.ndarray, left: int) -> tuple[np.ndarray, str]:
    """A stream's symbols and payload, after checking it ended where its encoder started."""
    carrying = s.carried // PAYLOAD_BITS
    if left or not (x[carrying:] == RANS_LOW).all() or not (
            x[:carrying] >> PAYLOAD_BITS == 1).all():
        raise ValueError("rANS stream is corrupt (state or length mismatch after decoding)")
    payload = to_bits(x[:carrying].astype(np.int64) - (1 << PAYLOAD_BITS), PAYLOAD_BITS)
    return out.ravel()[:len(s.tables)].astype(np.int64), payload


def decode_streams(streams: list[Stream]) -> list[tuple[np.ndarray, str]]:
    """rans_decode in batches of at most BATCH symbols and BATCH_TABLES tables, which bound its
    memory (lane grid: 6 bytes a symbol; slot tables: 6 * TOTAL bytes a table)."""
    results, batch, size = [], [], np.zeros(2, dtype=np.int64)
    for s in streams + [None]:
        step = (len(s.tables), len(s.freqs) + 1) if s is not None else (0, 0)
        if batch and (s is None or (size + step > [BATCH, BATCH_TABLES]).any()):
            results += rans_decode(batch)
            batch, size = [], size * 0
        if s is not None:
            batch.append(s)
            size += step
    return results


def _assemble(w: BitWriter, levels: np.ndarray, ids: np.ndarray, symbols: np.ndarray,
              payload: str = "") -> bytes:
    """A coded stream: bit header length, the header (w, then the tables), states, words."""
    write_tables(w, levels)
    freqs = level_freqs(levels)
    cum = np.cumsum(freqs, axis=1) - freqs
    states, words = rans_encode(freqs[ids, symbols], cum[ids, symbols], choose_lanes(len(ids)),
                                payload)
    header = w.getvalue()
    return write_varint(len(header)) + header + states + words


def _open(blob: bytes) -> tuple[BitReader, int]:
    """A reader over a stream's bit header, and where its lane states start."""
    size, start = read_varint(blob)
    if start + size > len(blob):
        raise ValueError("code section is truncated or corrupt (bad header length)")
    return BitReader(blob[start:start + size]), start + size


def _stream(blob: bytes, offset: int, ids: np.ndarray, freqs: np.ndarray,
            carried: int = 0) -> Stream:
    end = offset + 4 * choose_lanes(len(ids))
    if len(blob) < end or (len(blob) - end) % 2:
        raise ValueError("code section is truncated or corrupt (bad length)")
    return Stream(blob[offset:end], blob[end:], ids, freqs, carried)


def rans_pack(symbols: np.ndarray, alphabet: int) -> bytes:
    """Self-describing rANS blob of symbols in [0, alphabet), with one frequency table."""
    s = np.asarray(symbols, dtype=np.int64).ravel()
    if s.size and (s.min() < 0 or s.max() >= alphabet):
        raise ValueError(f"symbols span [{s.min()}, {s.max()}], outside [0, {alphabet})")
    w = BitWriter()
    w.golomb([len(s)], 8)
    return _assemble(w, count_levels(np.bincount(s, minlength=1)[None]), np.zeros_like(s), s)


def rans_unpack(blob: bytes) -> np.ndarray:
    r, offset = _open(blob)
    count = int(r.golomb(1, 8)[0])
    if 4 * choose_lanes(count) > len(blob):
        raise ValueError("rANS blob is truncated or corrupt (too short for its count)")
    freqs = level_freqs(read_tables(r, 1))
    return decode_streams([_stream(blob, offset, np.zeros(count, dtype=np.int64), freqs)])[0][0]


# --- tensor model ---------------------------------------------------------------------------

CHUNK = 512  # rows per block of the reference search (a CHUNK x WINDOW block of dot products)
WINDOW = 8192  # rows back a reference is searched for: the search costs rows x WINDOW x cols
WEIGHT_MAX = 8  # a reference row is scaled by k/4, |k| <= WEIGHT_MAX, before it is subtracted


def best_earlier_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the earlier row best at predicting it once scaled (largest cos^2), and that
    scale in quarters; (-1, 0) for the first row. The dot products are exact integers: float32
    sums them only where every partial sum stays below 2^24, so the choice is deterministic."""
    rows, cols = v.shape
    exact32 = cols * int(np.abs(v).max(initial=0)) ** 2 < 1 << 24
    x = v.astype(np.float32 if exact32 else np.float64)
    norms = np.maximum((x * x).sum(axis=1), 1)
    refs, weights = np.full(rows, -1), np.zeros(rows, dtype=np.int64)
    for a in range(1, rows, CHUNK):
        b, lo = min(rows, a + CHUNK), max(0, a - WINDOW)
        dots = x[a:b] @ x[lo:b].T
        score = dots * dots / norms[None, lo:b]  # cos^2 times the row's own norm
        score[:, a - lo:][np.triu_indices(b - a)] = -1  # only earlier rows
        refs[a:b] = lo + np.argmax(score, axis=1)
        weight = np.round(4 * dots[np.arange(b - a), refs[a:b] - lo] / norms[refs[a:b]])
        weights[a:b] = np.clip(weight, -WEIGHT_MAX, WEIGHT_MAX)
    return refs, weights


def scaled(rows: np.ndarray, weights) -> np.ndarray:
    """weight/4 times each reference row, rounded with integer arithmetic so that every machine
    predicts the same."""
    return (weights * rows + 2) >> 2


def predict(v: np.ndarray, refs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each row's prediction from its reference row (row 0 stands in where there is none)."""
    return scaled(v[np.maximum(refs, 0)], weights[:, None])


def choose_refs(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows worth coding as the difference from a scaled earlier row: those whose spread drops
    enough to pay for the reference (index and weight), as a table per spread would code them."""
    rows, cols = v.shape
    # A row saves at most the step from its spread to 1/12 (so nothing much for few columns); a
    # reference costs 5 bits and its index: skip the search where none could pay.
    most = cols / 2 * np.log2(12 * float(np.abs(v).max(initial=0)) ** 2 + 1)
    search = rows > 1 and most > 5 + min(rows, WINDOW).bit_length() - 1
    refs, weights = best_earlier_rows(v) if search else (np.full(rows, -1),
                                                         np.zeros(rows, np.int64))
    diff = v - predict(v, refs, weights)
    spread = (v.astype(np.float64) ** 2).sum(axis=1) / max(cols, 1) + 1 / 12
    diff_spread = (diff.astype(np.float64) ** 2).sum(axis=1) / max(cols, 1) + 1 / 12
    # 5 bits: the weight (~2 bits coded) and slack for the estimate, which is optimistic
    gain = cols / 2 * np.log2(spread / diff_spread) - ref_widths(np.arange(rows)) - 5
    use = (gain > 0) & (weights != 0) & (refs >= 0)
    return np.where(use, refs, -1), np.where(use, weights, 0)


def ref_widths(rows: np.ndarray) -> np.ndarray:
    """Bits of each reference's row index: row i can only refer to rows 0 .. i-1."""
    return np.frexp(np.asarray(rows) - 1)[1]


def equal_count_classes(stat: np.ndarray, kinds: int) -> np.ndarray:
    order = np.argsort(stat, kind="stable")
    out = np.empty(len(stat), dtype=np.int64)
    out[order] = np.arange(len(stat)) * kinds // max(1, len(stat))
    return out


class Contexts:
    """Row references, and which frequency table codes each code: (reference row or not, row
    class, column class)."""

    def __init__(self, refs, row_class, col_class, row_kinds: int, col_kinds: int):
        self.refs, self.row_class, self.col_class = refs, row_class, col_class
        self.row_kinds, self.col_kinds = row_kinds, col_kinds
        self.has_refs = bool((refs >= 0).any())
        self.tables = (1 + self.has_refs) * row_kinds * col_kinds

    @classmethod
    def fit(cls, coding: "Coding", row_kinds: int, col_kinds: int):
        """Equal-count classes of rows (raw and reference rows apart) and columns by mean |code|."""
        is_ref = coding.refs >= 0
        row_class = np.zeros(len(is_ref), dtype=np.int64)
        for group in (is_ref, ~is_ref):
            row_class[group] = equal_count_classes(coding.row_stat[group], row_kinds)
        col_class = equal_count_classes(coding.col_stat, col_kinds)
        return cls(coding.refs, row_class, col_class, row_kinds, col_kinds)

    def table_ids(self) -> np.ndarray:
        rows = ((self.refs >= 0) * self.row_kinds + self.row_class) * self.col_kinds
        return rows.astype(np.int32)[:, None] + self.col_class.astype(np.int32)[None, :]

    def write(self, w: BitWriter) -> None:
        rk, ck = self.row_kinds.bit_length() - 1, self.col_kinds.bit_length() - 1
        w.fixed([rk, ck, self.has_refs], 3)
        w.fixed(self.row_class, rk)
        w.fixed(self.col_class, ck)
        if self.has_refs:
            flagged = np.nonzero(self.refs >= 0)[0]
            w.fixed(self.refs >= 0, 1)
            widths = ref_widths(flagged)
            for width in np.unique(widths):  # rows ascending, so widths come in runs
                w.fixed(self.refs[flagged[widths == width]], width)

    @classmethod
    def read(cls, r: BitReader, rows: int, cols: int):
        rk, ck, has_refs = (int(x) for x in r.fixed(3, 3))
        if rk > 3 or ck > 4 or has_refs > 1:
            raise ValueError("code section is corrupt (bad context header)")
        row_class, col_class = r.fixed(rows, rk), r.fixed(cols, ck)
        refs = np.full(rows, -1)
        if has_refs:
            flagged = np.nonzero(r.fixed(rows, 1))[0]
            if not len(flagged):
                raise ValueError("code section is corrupt (references flagged on no row)")
            widths = ref_widths(flagged)
            refs[flagged] = np.concatenate([r.fixed(int((widths == width).sum()), width)
                                            for width in np.unique(widths)])
            if (refs[flagged] >= flagged).any():
                raise ValueError("code section is corrupt (a row refers to a later one)")
        return cls(refs, row_class, col_class, 1 << rk, 1 << ck)


def residuals(v: np.ndarray, refs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.where((refs >= 0)[:, None], v - predict(v, refs, weights), v)


def data_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        cost = PRECISION - np.log2(freqs)
    return float((counts * np.where(counts > 0, cost, 0)).sum())


def bit_count(write) -> int:
    """Bits that write(BitWriter) writes."""
    w = BitWriter()
    write(w)
    return sum(len(p) for p in w.parts)


class Coding:
    """A code matrix with row references applied: the symbols to code (codes or differences,
    minus vmin; the references' weights) and the statistics contexts are fitted on."""

    def __init__(self, v: np.ndarray, refs: np.ndarray, weights: np.ndarray):
        coded = residuals(v, refs, weights)
        self.refs, self.vmin = refs, int(coded.min()) if coded.size else 0
        self.symbols = (coded - self.vmin).astype(np.int32)
        self.weights = weights[refs >= 0] + WEIGHT_MAX
        self.alphabet = int(max(self.symbols.max(initial=0), self.weights.max(initial=0))) + 1
        mag = np.abs(coded)
        self.row_stat = mag.sum(axis=1)
        self.col_stat = (mag[refs < 0] if (refs < 0).any() else mag).sum(axis=0)


class Plan:
    """One candidate coding of a code matrix: references, contexts, tables and its size. Its
    stream: the reference rows' weights (their own table, after the contexts'), then the
    symbols row by row."""

    def __init__(self, coding: Coding, row_kinds: int, col_kinds: int):
        self.coding, self.vmin = coding, coding.vmin
        self.contexts = Contexts.fit(coding, row_kinds, col_kinds)
        tables, alphabet = self.contexts.tables, coding.alphabet
        counts = np.bincount((self.contexts.table_ids() * alphabet + coding.symbols).ravel(),
                             minlength=tables * alphabet).reshape(tables, alphabet)
        if self.contexts.has_refs:
            counts = np.vstack([counts, np.bincount(coding.weights, minlength=alphabet)])
        self.levels = count_levels(counts)
        self.bits = (data_bits(counts, level_freqs(self.levels))
                     + bit_count(self.contexts.write)
                     + table_bits(self.levels))

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """(table of each symbol, symbols) in coding order."""
        weights = self.coding.weights
        return (np.concatenate([np.full(len(weights), self.contexts.tables),
                                self.contexts.table_ids().ravel()]),
                np.concatenate([weights, self.coding.symbols.ravel()]))

    def name(self) -> str:
        c = self.contexts
        return "rans" + "+refs" * c.has_refs + f"+rows{c.row_kinds}" * (c.row_kinds > 1) + (
            f"+cols{c.col_kinds}" * (c.col_kinds > 1))


def choose_plan(v: np.ndarray) -> Plan:
    """The smallest of: with or without row references; column classes, then row classes."""
    rows, cols = v.shape
    refs, weights = choose_refs(v)
    best = None
    for option in [(np.full(rows, -1), weights * 0)] + [(refs, weights)] * bool(
            (refs >= 0).any()):
        coding = Coding(v, *option)
        plan = Plan(coding, 1, 1)
        for kinds in (2, 4, 8, MAX_COL_KINDS):
            if kinds <= cols:
                plan = min(plan, Plan(coding, 1, kinds), key=lambda p: p.bits)
        col_kinds = plan.contexts.col_kinds
        for kinds in (2, 4, MAX_ROW_KINDS):
            if kinds <= rows and kinds * col_kinds <= MAX_CONTEXTS:
                plan = min(plan, Plan(coding, kinds, col_kinds), key=lambda p: p.bits)
        best = plan if best is None or plan.bits < best.bits else best
    return best


def float_keys(patterns) -> np.ndarray:
    """fp16 bit patterns as keys in the order of their values (sign-magnitude to offset
    binary), so that close values of either sign get close keys and one histogram covers both."""
    p = np.asarray(patterns, dtype=np.int64)
    return np.where(p & 0x8000, 0xFFFF - p, p | 0x8000)


def float_patterns(keys) -> np.ndarray:
    k = np.asarray(keys, dtype=np.int64)
    return np.where(k & 0x8000, k & 0x7FFF, 0xFFFF - k)


class ScalePlan:
    """fp16 values (scales, passthrough floats) as float_keys: high bits through rANS with one
    table, the low `shift` bits (close to uniform: fp16's low mantissa bits are noise) as is."""

    def __init__(self, patterns: np.ndarray):
        keys, best = float_keys(patterns), None
        for shift in range(16):
            high = keys >> shift
            base = int(high.min()) if len(high) else 0
            if len(high) and high.max() - base >= TOTAL:  # the alphabet must fit one table
                continue
            counts = np.bincount(high - base, minlength=1)[None]
            levels = count_levels(counts)
            bits = data_bits(counts, level_freqs(levels)) + table_bits(levels)
            bits += 20 + shift * (len(keys) - 1)  # shift, base, low bits
            if best is None or bits < best[0]:
                best = (bits, shift, base, levels)
        self.bits, self.shift, self.base, self.levels = best
        self.symbols = (keys >> self.shift) - self.base
        self.low = to_bits(keys & ((1 << self.shift) - 1), self.shift)

    def write(self, w: BitWriter) -> None:
        w.fixed([self.shift], 4)
        w.fixed([self.base], 16 - self.shift)

    @staticmethod
    def read(r: BitReader) -> tuple[int, int]:
        shift = int(r.fixed(1, 4)[0])
        return shift, int(r.fixed(1, 16 - shift)[0])


def scale_patterns(symbols: np.ndarray, shift: int, base: int, low: str) -> np.ndarray:
    """ScalePlan's inverse: fp16 bit patterns from high parts and the low bits' text."""
    keys = ((symbols + base) << shift) | from_bits(low, len(symbols), shift)
    if len(keys) and keys.max() > 0xFFFF:
        raise ValueError("code section is corrupt (an fp16 value out of range)")
    return float_patterns(keys)


def _finish(w: BitWriter, levels: np.ndarray, ids: np.ndarray, symbols: np.ndarray,
            low: str) -> bytes:
    """A stream whose raw bits `low` ride in the lanes' initial states as far as they go, the
    rest at the end of the bit header (where the decoder knows how many symbols there are)."""
    carried = carried_bits(choose_lanes(len(symbols)), len(low))
    w.parts.append(low[carried:])
    return _assemble(w, levels, ids, symbols, low[:carried])


def encode_floats(tensors: list[np.ndarray]) -> bytes:
    """One rANS stream of fp16 tensors, each given as 2-D uint16 bit patterns: a tensor's
    values go through one ScalePlan, or, for tensors of at most MAX_ROW_KINDS rows where that
    is smaller, one per row (rows such as a residual mix's two weights differ in range)."""
    splits, plans = [], []
    for t in tensors:
        whole = ScalePlan(t.ravel())
        rows = [ScalePlan(row) for row in t] if 1 < len(t) <= MAX_ROW_KINDS else []
        split = bool(rows) and sum(p.bits for p in rows) < whole.bits
        splits.append(split)
        plans += rows if split else [whole]
    w = BitWriter()
    w.fixed(splits, 1)
    for p in plans:
        p.write(w)
    ids = np.repeat(np.arange(len(plans)), [len(p.symbols) for p in plans])
    symbols = np.concatenate([p.symbols for p in plans] + [np.zeros(0, np.int64)])
    levels = _pad_levels(*[p.levels for p in plans]) if plans else np.zeros((0, 1), np.int64)
    return _finish(w, levels, ids, symbols, "".join(p.low for p in plans))


def decode_floats(blob: bytes, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """encode_floats' inverse: uint16 bit patterns of each (rows, cols) tensor, flattened."""
    r, offset = _open(blob)
    sizes = []
    for (rows, cols), split in zip(shapes, r.fixed(len(shapes), 1), strict=True):
        if split and not 1 < rows <= MAX_ROW_KINDS:
            raise ValueError("fp16 section is corrupt (rows coded apart in a tensor of "
                             f"{rows} rows)")
        sizes += [cols] * rows if split else [rows * cols]
    fields = [ScalePlan.read(r) for _ in sizes]
    low_bits = [shift * n for (shift, _), n in zip(fields, sizes, strict=True)]
    carried = carried_bits(choose_lanes(sum(sizes)), sum(low_bits))
    tail = r.take(sum(low_bits) - carried)
    freqs = level_freqs(read_tables(r, len(sizes)))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    symbols, head = decode_streams([_stream(blob, offset, ids, freqs, carried)])[0]
    ends, low = np.cumsum(sizes, dtype=np.int64), head + tail
    low_ends = np.cumsum(low_bits, dtype=np.int64)
    values = np.concatenate([np.zeros(0, np.int64)] + [
        scale_patterns(symbols[end - n:end], shift, base, low[low_end - bits:low_end])
        for (shift, base), n, end, bits, low_end in zip(fields, sizes, ends, low_bits, low_ends,
                                                         strict=True)])
    # groups follow each other in the tensors' order, rows within a tensor in order
    return np.split(values, np.cumsum([rows * cols for rows, cols in shapes])[:-1])


def _pad_levels(*tables: np.ndarray) -> np.ndarray:
    width = max(t.shape[1] for t in tables)
    return np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tables])


def encode_tensor(codes: np.ndarray, scales: np.ndarray | None = None) -> tuple[str, bytes, int]:
    """(model name, section bytes, bytes of it attributed to the scales) for a 2-D int code
    matrix and, optionally, its row scales as uint16 bit patterns (fp16 viewed as uint16).
    Stream order: the scales' high parts, the references' weights, the codes row by row; the
    scales' low bits ride in the lanes' initial states as far as they go, the rest in the bit
    header (after the contexts, which tell the decoder how many symbols, so lanes, there are)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and np.abs(codes).max() > TOTAL // 8:
        # differences from references (up to 3x as large) must fit one frequency table too
        raise ValueError(f"codes span [{codes.min()}, {codes.max()}], beyond +-{TOTAL // 8}")
    if scales is not None and len(scales) and not 0 <= scales.min() <= scales.max() < 1 << 16:
        raise ValueError("scales must be uint16 bit patterns")
    plan = choose_plan(codes)
    levels, (ids, symbols) = plan.levels, plan.stream()
    w, low, scale_bits = BitWriter(), "", 0
    w.fixed([scales is not None], 1)
    if scales is not None:
        scale = ScalePlan(scales.astype(np.int64))
        scale.write(w)
        ids = np.concatenate([np.full(len(scales), len(levels)), ids])
        levels = _pad_levels(levels, scale.levels)
        symbols = np.concatenate([scale.symbols, symbols])
        low, scale_bits = scale.low, scale.bits
    w.golomb(zigzag([plan.vmin]), 2)
    plan.contexts.write(w)
    blob = _finish(w, levels, ids, symbols, low)
    return plan.name(), blob, min(len(blob), round(scale_bits / 8))


def _open_tensor(blob: bytes, rows: int, cols: int) -> tuple[Stream, Callable]:
    """A tensor section's rANS stream, and what turns its decoded symbols into (codes,
    patterns)."""
    r, offset = _open(blob)
    has_scales = bool(r.fixed(1, 1)[0])
    shift, base = ScalePlan.read(r) if has_scales else (0, 0)
    vmin = int(r.golomb(1, 2)[0])
    contexts = Contexts.read(r, rows, cols)
    tables, flagged = contexts.tables, np.nonzero(contexts.refs >= 0)[0]
    carried = carried_bits(choose_lanes(rows * (cols + has_scales) + len(flagged)), rows * shift)
    tail = r.take(rows * shift - carried)
    freqs = level_freqs(read_tables(r, tables + contexts.has_refs + has_scales))
    ids = np.concatenate([np.full(rows * has_scales, tables + contexts.has_refs),
                          np.full(len(flagged), tables), contexts.table_ids().ravel()])

    def finish(symbols: np.ndarray, head: str) -> tuple[np.ndarray, np.ndarray | None]:
        patterns = None
        if has_scales:
            patterns = scale_patterns(symbols[:rows], shift, base, head + tail)
            symbols = symbols[rows:]
        weights, codes = symbols[:len(flagged)] - WEIGHT_MAX, symbols[len(flagged):]
        codes = codes.reshape(rows, cols) + ((vmin >> 1) ^ -(vmin & 1))
        for i, weight in zip(flagged, weights, strict=True):  # references point back
            codes[i] += scaled(codes[contexts.refs[i]], weight)
        return codes, patterns

    return _stream(blob, offset, ids, freqs, carried), finish


def decode_tensors(sections: list[tuple[bytes, int, int]]) -> list[tuple]:
    """(codes as int64 rows x cols, uint16 scale patterns or None) of each (section, rows, cols):
    the inverse of encode_tensor, all sections' rANS streams decoded together."""
    opened = [_open_tensor(*section) for section in sections]
    decoded = decode_streams([stream for stream, _ in opened])
    return [finish(*d) for (_, finish), d in zip(opened, decoded, strict=True)]


def decode_tensor(blob: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray | None]:
    return decode_tensors([(blob, rows, cols)])[0]
