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

Code matrices go through the artifact's tensor coder (codec.encode_tensor), so a matrix left
plain costs exactly what the artifact would store; other integer streams through codec.rans_pack.
"""

import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.quant.blob import (
    check_inputs,
    check_shape,
    frame,
    pack_codes,
    pack_matrix,
    unframe,
    unpack_codes,
    unpack_matrix,
    unpack_symbols,
)
from pgolf.quant.codec import rans_pack
from pgolf.quant.gptq import (
    GPTQConfig,
    gptq,
    obs_sweep,
    prepare,
    qmax,
    round_to_nearest,
    sdclip_scales,
    upper_hinv,
)

# |a_j| + |b_j| scales the neighbours' rounding error (up to s/2 each) in the prediction, so a
# larger coefficient cannot predict within a fraction of a step anyway; the cap keeps fp16 sane.
COEF_MAX = 4.0



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
