"""Freeze-dry: drop weights that their two neighbouring columns predict, and rebuild them on load.

Why: seed technique A2 claimed bytes from weights that are linear combinations of their neighbours,
but the shipped code zeroed those weights (error |w|, not |w - prediction|), stored no coefficients,
used an absolute threshold and a 5 % gate, was ill-posed when a neighbour was itself dropped, and
ran after integer quantization, so it did nothing. This is the corrected design, off by default.

What, for a matrix W (rows x cols) on the pipeline's symmetric grid (SDClip row steps s_i):
- Candidates are the odd interior columns j = 1, 3, 5, ...; every other column is an anchor and is
  always coded. No two candidates are adjacent, so each prediction reads only coded columns and the
  decoder is exact and order-free.
- GPTQ runs over the anchors first, then over the candidates (act-order within each group), so a
  candidate is decided against its neighbours' *dequantized* values q_{j-1}, q_{j+1}.
- For candidate j, (a_j, b_j) is the least-squares fit of the (GPTQ-updated) column on q_{j-1} and
  q_{j+1}, stored in fp16. Element (i, j) is dropped when |w_ij - a_j q_{i,j-1} - b_j q_{i,j+1}| is
  at most `threshold` * s_i (relative to the row's step, not absolute) and is rebuilt from that
  prediction; kept elements are rounded to the grid. Either way the error is spread GPTQ-style.
  A column drops anything only if the code bits it saves (from the matrix's code histogram)
  exceed its mask's H(p) bits per row plus 32 bits of coefficients.
- Stored: scales, surviving codes, a mode per candidate column (nothing / every row / some
  rows dropped), the drop mask of the "some rows" columns (one rANS stream, about H(p) bits per
  element) and the coefficients of columns that drop anything. The result is kept only when the
  packed tensor is at least `min_saving` smaller than plain GPTQ packed the same way; otherwise
  the plain GPTQ codes are returned (no mask, no coefficients).

This module also holds what sparse24 shares with it: input checks, the GPTQ column sweep with a
pluggable quantizer (gptq.py's kernel hard-codes rounding) and the framing of self-describing blobs.
Code matrices go through the artifact's tensor coder (codec.encode_tensor), so a matrix left
plain costs exactly what the artifact would store; other integer streams through codec.rans_pack.
"""

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.quant.codec import decode_tensor, encode_tensor, rans_pack, rans_unpack
from pgolf.quant.gptq import GPTQConfig, gptq, qmax, round_to_nearest, sdclip_scales

# |a_j| + |b_j| scales the neighbours' rounding error (up to s/2 each) in the prediction, so a
# larger coefficient cannot predict within a fraction of a step anyway; the cap keeps fp16 sane.
COEF_MAX = 4.0


# ---- shared with sparse24 -------------------------------------------------------------------

def check_inputs(W: torch.Tensor, H: torch.Tensor, *, bits: int, clip_sigmas: float) -> None:
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {list(W.shape)}")
    if tuple(H.shape) != (W.size(1), W.size(1)):
        raise ValueError(f"Hessian shape {list(H.shape)} does not match {W.size(1)} columns")
    qmax(bits)  # raises ValueError outside 2..8 bits
    if not clip_sigmas > 0:
        raise ValueError(f"clip_sigmas={clip_sigmas}: must be positive")


def prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies, dead inputs handled as gptq.gptq does: H_jj = 0 -> column zeroed, H_jj = 1."""
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def upper_hinv(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Hinv: the upper Cholesky factor of (H + damp * mean(diag H) I)^-1, as in GPTQ."""
    H = H + damp * torch.diag(H).mean() * torch.eye(len(H), device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


Quantizer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, quantize: Quantizer, *,
              block_size: int) -> torch.Tensor:
    """GPTQ's column sweep (lazy batch updates) with a pluggable quantizer; W is updated in place.

    Columns are taken in W's order. `quantize(j, rest, d)` gets column j's position, the current
    (error-compensated) columns j.. of its block and diag(Hinv) over them, and returns column j's
    dequantized value; its error is spread over the later columns through Hinv row j. Returns
    the dequantized columns, in W's order.
    """
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block_size):
        i2 = min(i1 + block_size, W.size(1))
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            value = Q[:, i1 + j] = quantize(i1 + j, W1[:, j:], d[j:])
            err = (W1[:, j] - value) / Hinv1[j, j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


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


# ---- freeze-dry ------------------------------------------------------------------------------

MAGIC = b"PGFD"
VERSION = 1
HEAD = struct.Struct("<BBIIB")  # version, bits, rows, cols, applied
# Candidate column modes: nothing dropped (no coefficients stored), every row dropped (no mask
# needed), or some rows dropped (mask bits in one rANS stream shared by all such columns).
NONE, ALL, MIXED = 0, 1, 2


@dataclass(kw_only=True)
class FreezeDryConfig:
    enabled: bool = False  # read by the caller; off: no gain measured on the demo model
    threshold: float = 0.5  # drop when |w - prediction| <= threshold * row step (rounding's max)
    min_saving: float = 0.02  # keep only if the packed tensor shrinks by this fraction
    force: bool = False  # keep even without a saving (to measure what it would cost)
    column_gate: bool = True  # drop in a column only where that saves bits (off: to measure)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)  # the same kernel settings as plain

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"freeze_dry.threshold={self.threshold}: must be >= 0")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"freeze_dry.min_saving={self.min_saving}: must be in [0, 1)")


@dataclass
class FreezeDried:
    codes: torch.Tensor  # int8 (rows, cols); 0 where dropped
    scales: torch.Tensor  # fp16 (rows,)
    bits: int
    dropped: torch.Tensor  # bool (rows, cols); only ever True in candidate columns
    coef: torch.Tensor  # fp16 (cols, 2): (a_j, b_j) where column j drops something, else 0
    applied: bool  # False: plain GPTQ codes, nothing dropped, no coefficients stored

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped.float().mean())


def candidate_columns(cols: int) -> torch.Tensor:
    """Odd interior columns: an independent set whose neighbours are all coded."""
    return torch.arange(1, cols - 1, 2)


def predict(left: torch.Tensor, right: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """a * left + b * right in float32; encoder and decoder share it so they agree bit for bit."""
    coef = coef.float()
    return coef[..., 0] * left + coef[..., 1] * right


def fit(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Least-squares (a, b) for w ~ a left + b right, capped and rounded to fp16 as stored."""
    A = torch.stack([left, right], dim=1).double()
    ab = torch.linalg.lstsq(A, w.double()[:, None], driver="gelsd").solution[:, 0]
    return ab.clamp(-COEF_MAX, COEF_MAX).to(torch.float16)


def code_bits(W: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Bits an entropy coder spends per code value, from the matrix's rounded-code histogram."""
    q = qmax(bits)
    counts = torch.bincount((round_to_nearest(W, scale, bits=bits).long() + q).ravel(),
                            minlength=2 * q + 1).double() + 0.5  # unseen codes are not free
    return -torch.log2(counts / counts.sum())


def pays_off(drop: torch.Tensor, saved_bits: torch.Tensor) -> bool:
    """Whether dropping these rows of a column saves more code bits than its mask and (a, b)."""
    p = float(drop.double().mean())
    if p == 0:
        return False
    mask_bits = 0.0 if p == 1 else -len(drop) * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return float(saved_bits[drop].sum()) > mask_bits + 32


def _plain(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> FreezeDried:
    rows, cols = codes.shape
    return FreezeDried(codes=codes, scales=scales, bits=bits,
                       dropped=torch.zeros(rows, cols, dtype=torch.bool),
                       coef=torch.zeros(cols, 2, dtype=torch.float16), applied=False)


def _column_order(H: torch.Tensor, columns: torch.Tensor, act_order: bool) -> torch.Tensor:
    if not act_order:
        return columns
    return columns[torch.argsort(torch.diag(H)[columns], descending=True, stable=True)]


def freeze_dry_sweep(W, H, scale, *, bits: int, cfg: FreezeDryConfig):
    """The freeze-dry kernel on prepared W, H: (representation, the dequantized W it assumed)."""
    rows, cols = W.shape
    cand = candidate_columns(cols)
    is_cand = torch.zeros(cols, dtype=torch.bool)
    is_cand[cand] = True
    perm = torch.cat([_column_order(H, (~is_cand).nonzero()[:, 0], cfg.gptq.act_order),
                      _column_order(H, cand, cfg.gptq.act_order)])
    Hinv = upper_hinv(H[perm][:, perm], cfg.gptq.damp)
    s, q, cost = scale.float(), qmax(bits), code_bits(W, scale, bits)
    rep = _plain(torch.zeros(rows, cols, dtype=torch.int8), scale, bits)
    rep.applied = True
    assumed = torch.zeros(rows, cols)

    def quantize(k: int, rest: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        c, w = int(perm[k]), rest[:, 0]
        code = torch.clamp(torch.round(w / s), -q, q)
        value = code * s
        if is_cand[c]:
            left, right = assumed[:, c - 1], assumed[:, c + 1]
            ab = fit(w, left, right)
            guess = predict(left, right, ab)
            drop = (w - guess).abs() <= cfg.threshold * s
            if drop.any() and (not cfg.column_gate or pays_off(drop, cost[code.long() + q])):
                code, value = code.masked_fill(drop, 0), torch.where(drop, guess, value)
                rep.dropped[:, c], rep.coef[c] = drop, ab
        rep.codes[:, c], assumed[:, c] = code.to(torch.int8), value
        return value

    obs_sweep(W[:, perm], Hinv, quantize, block_size=cfg.gptq.block_size)
    return rep, assumed


def encode(W: torch.Tensor, H: torch.Tensor, *, bits: int, clip_sigmas: float,
           cfg: FreezeDryConfig | None = None) -> FreezeDried:
    """Freeze-dried W if that packs at least `cfg.min_saving` smaller, else plain GPTQ codes."""
    cfg = cfg or FreezeDryConfig()
    check_inputs(W, H, bits=bits, clip_sigmas=clip_sigmas)
    g = cfg.gptq
    plain = _plain(*gptq(W, H, bits=bits, clip_sigmas=clip_sigmas, block_size=g.block_size,
                         damp=g.damp, act_order=g.act_order), bits)
    if W.size(1) < 3:
        return plain  # no column has two neighbours
    scale = sdclip_scales(W, bits=bits, clip_sigmas=clip_sigmas)  # before dead columns, as gptq
    dried, _ = freeze_dry_sweep(*prepare(W, H), scale, bits=bits, cfg=cfg)
    if cfg.force or len(pack(dried)) <= (1 - cfg.min_saving) * len(pack(plain)):
        return dried
    return plain


def column_modes(dropped: torch.Tensor) -> torch.Tensor:
    """NONE / ALL / MIXED per column of a (rows, columns) drop mask."""
    n = dropped.sum(dim=0)
    return torch.where(n == 0, NONE, torch.where(n == len(dropped), ALL, MIXED))


def anchor_columns(cols: int) -> torch.Tensor:
    keep = torch.ones(cols, dtype=torch.bool)
    keep[candidate_columns(cols)] = False
    return keep.nonzero()[:, 0]


def pack(rep: FreezeDried) -> bytes:
    """Plain: one code matrix with its scales, exactly as the artifact codes a tensor. Applied:
    anchor columns + scales as that matrix, then the candidates' surviving codes, column modes,
    the mixed columns' drop mask and the (a, b) of every column that drops anything."""
    rows, cols = rep.codes.shape
    head = HEAD.pack(VERSION, rep.bits, rows, cols, int(rep.applied))
    if not rep.applied:
        return frame(MAGIC, head, [pack_matrix(rep.codes, rep.scales)])
    cand = candidate_columns(cols)
    modes = column_modes(rep.dropped[:, cand])
    mask = rep.dropped[:, cand[modes == MIXED]].numpy().astype(np.int64)
    survivors = rep.codes[:, cand][~rep.dropped[:, cand]]
    return frame(MAGIC, head, [
        pack_matrix(rep.codes[:, anchor_columns(cols)], rep.scales),
        pack_codes(survivors, rep.bits),
        ("rans", rans_pack(modes.numpy(), 3)), ("rans", rans_pack(mask, 2)),
        ("fp16", rep.coef[cand[modes != NONE]].numpy().astype("<f2").tobytes())])


def _unpack_drops(rep: FreezeDried, sections: list[tuple[str, bytes]]) -> None:
    """Fill rep.dropped and rep.coef from the modes, mask and coefficient sections."""
    rows, cols = rep.codes.shape
    cand = candidate_columns(cols)
    if [codec for codec, _ in sections] != ["rans", "rans", "fp16"]:
        raise ValueError(f"drop sections are {[c for c, _ in sections]}, "
                         "expected ['rans', 'rans', 'fp16']")
    modes = torch.from_numpy(unpack_symbols("modes", sections[0][1], 3, len(cand)))
    mixed, used = cand[modes == MIXED], cand[modes != NONE]
    mask = unpack_symbols("mask", sections[1][1], 2, rows * len(mixed))
    rep.dropped[:, cand[modes == ALL]] = True
    rep.dropped[:, mixed] = torch.from_numpy(mask.reshape(rows, len(mixed)).astype(bool))
    coef = np.frombuffer(sections[2][1], dtype="<f2")
    if coef.size != 2 * len(used) or len(sections[2][1]) % 2 or not np.isfinite(coef).all():
        raise ValueError(f"coefficient section holds {len(sections[2][1]) / 2:g} values, "
                         f"expected {2 * len(used)} finite fp16")
    rep.coef[used] = torch.from_numpy(coef.reshape(-1, 2).astype(np.float16))


def unpack(blob: bytes) -> FreezeDried:
    """Inverse of `pack`; ValueError on truncated or corrupt input."""
    (version, bits, rows, cols, applied), sections = unframe(blob, MAGIC, HEAD)
    if version != VERSION:
        raise ValueError(f"freeze-dry blob version {version}, expected {VERSION}")
    qmax(bits)
    check_shape(rows, cols)
    if applied > 1 or len(sections) != (5 if applied else 1):
        raise ValueError(f"freeze-dry blob has {len(sections)} sections (applied={applied})")
    if not applied:
        return _plain(*unpack_matrix(sections[0], rows, cols, bits=bits, with_scales=True), bits)
    anchors, cand = anchor_columns(cols), candidate_columns(cols)
    codes, scales = unpack_matrix(sections[0], rows, len(anchors), bits=bits, with_scales=True)
    rep = _plain(torch.zeros(rows, cols, dtype=torch.int8), scales, bits)
    rep.codes[:, anchors], rep.applied = codes, True
    _unpack_drops(rep, sections[2:])
    kept = ~rep.dropped[:, cand]
    survivors = torch.zeros(rows, len(cand), dtype=torch.int8)
    survivors[kept] = torch.from_numpy(unpack_codes(*sections[1], bits, int(kept.sum())))
    rep.codes[:, cand] = survivors
    return rep


def dequantize(rep: FreezeDried) -> torch.Tensor:
    """Float32 W: codes times row steps, dropped elements rebuilt from their coded neighbours."""
    W = rep.codes.float() * rep.scales.float()[:, None]
    if rep.applied:
        cand = candidate_columns(W.size(1))
        guess = predict(W[:, cand - 1], W[:, cand + 1], rep.coef[cand])
        W[:, cand] = torch.where(rep.dropped[:, cand], guess, W[:, cand])
    return W
