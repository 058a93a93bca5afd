"""2:4 sparsity packing: keep 2 of every 4 weights per row, chosen and compensated SparseGPT-style.

Why: seed technique A3 kept the 2 largest |w| of each block of 4, stored the kept pair as one
unpacked uint8 (its entropy is at most log2 6 = 2.58 bits), and quantized the kept values with a
mid-rise quantizer that has no zero level and a float32 scale per row. This is the corrected
design, off by default. Pruning half of the weights after training, without sparse fine-tuning,
is expected to do large damage to a model of this size; bench/optional_codecs.py measures it.

What, for a matrix W (rows x cols, cols a multiple of 4), in the papers' names:
- Kept values use the pipeline's symmetric grid (codes in [-qmax, qmax], zero included) with the
  SDClip fp16 row steps of plain GPTQ.
- Columns are swept in their natural order (blocks of 4 must stay adjacent, so no act-order).
  At the first column of each block of 4 the kept pair of every row is chosen by saliency on the
  current, error-compensated weights: OBS (SparseGPT) w^2 / [H_F^-1]_jj, where [H_F^-1]_jj equals
  Hinv_jj^2 for the upper Cholesky factor Hinv over the not yet quantized columns F; or w^2 H_jj;
  or w^2.
  Each column is then pruned (value 0) or rounded, and its error spread over the later columns as
  in GPTQ (Frantar & Alistarh 2023, SparseGPT). As gptq.py does with RTN, the result is kept only
  if its Hessian-weighted error is no larger than naive magnitude-prune-then-round's.
- Stored: the kept codes (rows x cols/2) with their fp16 scales through the artifact's tensor
  coder, and the pair index of every block (0..5, one rANS stream: at most log2 6 bits a block
  plus a small table).
"""

import struct
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.quant.blob import (
    check_inputs,
    check_shape,
    frame,
    pack_matrix,
    unframe,
    unpack_matrix,
    unpack_symbols,
)
from pgolf.quant.codec import rans_pack
from pgolf.quant.gptq import (
    obs_sweep,
    prepare,
    qmax,
    round_to_nearest,
    sdclip_scales,
    upper_hinv,
    weighted_error,
)

MAGIC = b"PG24"
VERSION = 1
HEAD = struct.Struct("<BBII")  # version, bits, rows, cols
PAIRS = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
SALIENCY = ("obs", "hessian", "magnitude")
# A block's 4-bit keep mask -> its pair index; -1 marks masks that do not keep exactly two.
PAIR_OF_MASK = torch.full((16,), -1, dtype=torch.long)
PAIR_OF_MASK[(1 << PAIRS[:, 0]) | (1 << PAIRS[:, 1])] = torch.arange(len(PAIRS))


@dataclass(kw_only=True)
class Sparse24Config:
    enabled: bool = False  # read by the caller; off: pruning a dense-trained model costs a lot
    saliency: str = "obs"  # which kept pair: "obs" w^2/[H^-1]_jj, "hessian" w^2 H_jj, "magnitude"
    block_size: int = 128  # GPTQ lazy-batch width; a multiple of 4 so no block of 4 straddles two
    damp: float = 0.01

    def __post_init__(self):
        if self.saliency not in SALIENCY:
            raise ValueError(f"sparse24.saliency={self.saliency!r}: expected one of {SALIENCY}")
        if self.block_size <= 0 or self.block_size % 4:
            raise ValueError(f"sparse24.block_size={self.block_size}: a positive multiple of 4")


@dataclass
class Sparse24:
    pairs: torch.Tensor  # uint8 (rows, cols // 4): index into PAIRS of each block's kept pair
    codes: torch.Tensor  # int8 (rows, cols // 2): kept codes, in column order
    scales: torch.Tensor  # fp16 (rows,)
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.size(0), 2 * self.codes.size(1)


def from_mask(keep: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
              bits: int) -> Sparse24:
    """The representation of full-size codes whose keep mask holds 2 of every 4 per row."""
    rows, cols = keep.shape
    nibble = (keep.view(rows, cols // 4, 4).long() << torch.arange(4)).sum(dim=2)
    pairs = PAIR_OF_MASK[nibble]
    assert (pairs >= 0).all(), "keep mask must hold exactly 2 of every 4"
    return Sparse24(pairs=pairs.to(torch.uint8), codes=codes[keep].view(rows, cols // 2),
                    scales=scales, bits=bits)


def top2(saliency: torch.Tensor) -> torch.Tensor:
    """Keep mask (rows, 4 * blocks) of the two most salient entries of every block of 4."""
    rows = saliency.size(0)
    blocks = saliency.view(rows, -1, 4)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(2, blocks.topk(2, dim=2).indices, True)
    return keep.view(rows, -1)


def magnitude_prune(W: torch.Tensor, scales: torch.Tensor, *, bits: int) -> Sparse24:
    """The naive baseline: keep the two largest |w| of each block of 4, round to nearest."""
    keep = top2(W.float().abs())
    return from_mask(keep, round_to_nearest(W, scales, bits=bits) * keep, scales, bits)


def sparse_sweep(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, *, bits: int,
                 cfg: Sparse24Config) -> tuple[Sparse24, torch.Tensor]:
    """The SparseGPT-style kernel on prepared W, H (natural column order): (representation, the
    dequantized W it assumed)."""
    rows, cols = W.shape
    Hinv = upper_hinv(H, cfg.damp)
    s, q, H_diag = scale.float(), qmax(bits), torch.diag(H)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    codes = torch.zeros(rows, cols, dtype=torch.int8)

    def quantize(j: int, rest: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if j % 4 == 0:
            w2 = rest[:, :4] ** 2
            saliency = {"obs": lambda: w2 / d[:4] ** 2, "hessian": lambda: w2 * H_diag[j:j + 4],
                        "magnitude": lambda: w2}[cfg.saliency]()
            keep[:, j:j + 4] = top2(saliency)
        code = torch.clamp(torch.round(rest[:, 0] / s), -q, q) * keep[:, j]
        codes[:, j] = code.to(torch.int8)
        return code * s

    assumed = obs_sweep(W, Hinv, quantize, block_size=cfg.block_size)
    return from_mask(keep, codes, scale, bits), assumed


def encode(W: torch.Tensor, H: torch.Tensor, *, bits: int, clip_sigmas: float,
           cfg: Sparse24Config | None = None) -> Sparse24:
    """2:4-sparse W: compensated sweep, or magnitude pruning if that is no worse on H."""
    cfg = cfg or Sparse24Config()
    check_inputs(W, H, bits=bits, clip_sigmas=clip_sigmas)
    if W.size(1) % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 columns, got {W.size(1)}")
    scale = sdclip_scales(W, bits=bits, clip_sigmas=clip_sigmas)  # before dead columns, as gptq
    W, H = prepare(W, H)
    swept, _ = sparse_sweep(W.clone(), H, scale, bits=bits, cfg=cfg)
    naive = magnitude_prune(W, scale, bits=bits)
    # The sweep is greedy, not provably better on every input; keep whichever is better on H.
    if weighted_error(W, dequantize(swept), H) > weighted_error(W, dequantize(naive), H):
        return naive
    return swept


def pack(rep: Sparse24) -> bytes:
    rows, cols = rep.shape
    sections = [pack_matrix(rep.codes, rep.scales),
                ("rans", rans_pack(rep.pairs.numpy().astype(np.int64), len(PAIRS)))]
    return frame(MAGIC, HEAD.pack(VERSION, rep.bits, rows, cols), sections)


def unpack(blob: bytes) -> Sparse24:
    """Inverse of `pack`; ValueError on truncated or corrupt input."""
    (version, bits, rows, cols), sections = unframe(blob, MAGIC, HEAD)
    if version != VERSION:
        raise ValueError(f"2:4 blob version {version}, expected {VERSION}")
    qmax(bits)
    check_shape(rows, cols)
    if cols % 4 or len(sections) != 2 or sections[1][0] != "rans":
        raise ValueError(f"2:4 blob of {cols} columns with sections {[c for c, _ in sections]}")
    codes, scales = unpack_matrix(sections[0], rows, cols // 2, bits=bits, with_scales=True)
    pairs = unpack_symbols("pair index", sections[1][1], len(PAIRS), rows * cols // 4)
    return Sparse24(pairs=torch.from_numpy(pairs.reshape(rows, cols // 4).astype(np.uint8)),
                    codes=codes, scales=scales, bits=bits)


def dequantize(rep: Sparse24) -> torch.Tensor:
    """Float32 W: kept codes times row steps scattered to their pair positions, zeros elsewhere."""
    rows, cols = rep.shape
    values = (rep.codes.float() * rep.scales.float()[:, None]).view(rows, cols // 4, 2)
    W = torch.zeros(rows, cols // 4, 4)
    W.scatter_(2, PAIRS[rep.pairs.long()], values)
    return W.view(rows, cols)
