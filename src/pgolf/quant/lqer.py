"""LQER: a low-rank correction of a quantized matrix's error, its factors quantized and coded.

LQER (low-rank quantization error reconstruction), as the SOTA record applies it after GPTQ:
E = W - W_hat; truncated SVD E ~ U_r S_r V_r^T; A = U_r S_r (rows x r), B = V_r^T (r x cols).
Asymmetric pack: A on the a_bits grid [-2^(a_bits-1), 2^(a_bits-1) - 1] with one fp16 scale
max|A| / (2^(a_bits-1) - 1/2) (the record's int2: [-2, 1], max/1.5); B flattened into groups of
`group` values, each on the b_bits grid with its own fp16 scale max|group| / (2^(b_bits-1) - 1/2)
(int4: [-8, 7], max/7.5), the last group shorter when the size is not a multiple. The matrix
then stands for W_hat + A_hat B_hat.

A correction's section in the artifact: A's scale (fp16 bit pattern, 2 bytes little-endian) |
varint length of A's part | A's codes (codec.encode_tensor, rows x r) | B's codes as a
(groups x group) matrix with its group scales (codec.encode_tensor; the last group padded with
zero codes). So section_bytes() is exactly what the correction adds to the artifact.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.quant.codec import decode_tensors, encode_tensor, read_varint, write_varint

SCALE_EPS = 1e-10


@dataclass(kw_only=True)
class LQERConfig:
    rank: int = 0  # 0 = off; the record: 4
    a_bits: int = 2  # A's grid, one scale per matrix (the record: 2)
    b_bits: int = 4  # B's grid, one scale per group (the record: 4)
    group: int = 64  # B's values per scale, flattened (the record: 64)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lqer.rank = {self.rank!r}: must be an integer >= 0 (0 = off)")
        for key in ("a_bits", "b_bits"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"lqer.{key} = {value!r}: must be an integer in 2..8")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"lqer.group = {self.group!r}: must be an integer >= 1")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check_shapes(self, shapes: dict) -> None:
        """rank must not exceed min(rows, cols) of any matrix it may correct (named if so)."""
        if not self.enabled or not shapes:
            return
        name, shape = min(shapes.items(), key=lambda kv: (min(kv[1]), kv[0]))
        if self.rank > min(shape):
            raise ValueError(f"lqer.rank = {self.rank}: above the rank {min(shape)} of {name} "
                             f"({shape[0]} x {shape[1]})")


def grid(bits: int) -> tuple[int, int, float]:
    """(lowest code, highest code, max|x| / scale) of the asymmetric `bits`-bit grid."""
    half = 1 << (bits - 1)
    return -half, half - 1, half - 0.5


def quantize_asym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of every row of x on the asymmetric grid, one fp16 scale per row."""
    lo, hi, top = grid(bits)
    scale = (x.abs().amax(dim=1).clamp_min(SCALE_EPS) / top).to(torch.float16)
    codes = torch.clamp(torch.round(x / scale.float()[:, None]), lo, hi).to(torch.int8)
    return codes, scale


def groups_of(B: torch.Tensor, group: int) -> torch.Tensor:
    """B flattened into rows of `group` values, the last padded with zeros."""
    flat = B.reshape(-1)
    pad = -len(flat) % group
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, group)


@dataclass
class LowRank:
    """A quantized correction: A's codes (rows x r) and scale, B's codes (r x cols) and group
    scales, and the grids they live on."""
    a_codes: torch.Tensor  # int8
    a_scale: torch.Tensor  # fp16, one value
    b_codes: torch.Tensor  # int8
    b_scales: torch.Tensor  # fp16, one per group
    a_bits: int
    b_bits: int
    group: int

    @property
    def rank(self) -> int:
        return self.a_codes.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_hat, B_hat) in float32."""
        A = self.a_codes.float() * self.a_scale.float()
        b = groups_of(self.b_codes.float(), self.group) * self.b_scales.float()[:, None]
        return A, b.reshape(-1)[:self.b_codes.numel()].view(self.b_codes.shape)

    def dequantize(self) -> torch.Tensor:
        A, B = self.factors()
        return A @ B


def correction(E: torch.Tensor, cfg: LQERConfig, rank: int | None = None) -> LowRank:
    """The quantized rank-r correction of an error matrix E (r = cfg.rank unless given)."""
    r = cfg.rank if rank is None else rank
    assert 0 < r <= min(E.shape), (r, E.shape)
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    A, B = U[:, :r] * S[:r], Vh[:r]
    a_codes, a_scale = quantize_asym(A.reshape(1, -1), cfg.a_bits)
    b_codes, b_scales = quantize_asym(groups_of(B, cfg.group), cfg.b_bits)
    return LowRank(a_codes.view(A.shape), a_scale.reshape(()),
                   b_codes.reshape(-1)[:B.numel()].view(B.shape), b_scales,
                   cfg.a_bits, cfg.b_bits, cfg.group)


def correct(W: torch.Tensor, W_hat: torch.Tensor, cfg: LQERConfig,
            rank: int | None = None) -> LowRank:
    """The correction of W_hat (GPTQ's dequantized W) towards W."""
    return correction(W.float() - W_hat.float(), cfg, rank)


def encode(lr: LowRank) -> bytes:
    """A correction's artifact section (see the module docstring)."""
    a_scale = np.asarray(lr.a_scale.cpu(), dtype=np.float16).reshape(1).view(np.uint16)
    a_part = encode_tensor(lr.a_codes.cpu().numpy())[1]
    b = groups_of(lr.b_codes.cpu(), lr.group).numpy()
    b_part = encode_tensor(b, lr.b_scales.cpu().numpy().astype(np.float16).view(np.uint16))[1]
    return a_scale.astype("<u2").tobytes() + write_varint(len(a_part)) + a_part + b_part


def section_bytes(lr: LowRank) -> int:
    return len(encode(lr))


def _checked(codes: np.ndarray, bits: int, what: str) -> torch.Tensor:
    lo, hi, _ = grid(bits)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"LQER {what} codes span [{codes.min()}, {codes.max()}], outside "
                         f"int{bits}'s [{lo}, {hi}]")
    return torch.from_numpy(codes.astype(np.int8))


def decode(blob: bytes, *, rows: int, cols: int, rank: int, a_bits: int, b_bits: int,
           group: int) -> LowRank:
    """encode's inverse for a rows x cols matrix corrected at `rank`."""
    if len(blob) < 3:
        raise ValueError(f"LQER section of {len(blob)} bytes is truncated")
    a_scale = np.frombuffer(blob[:2], dtype="<u2").astype(np.uint16).view(np.float16)
    length, pos = read_varint(blob, 2)
    if pos + length > len(blob):
        raise ValueError("LQER section is truncated (A's part runs past its end)")
    groups = math.ceil(rank * cols / group)
    (a, _), (b, b_scales) = decode_tensors([(blob[pos:pos + length], rows, rank),
                                            (blob[pos + length:], groups, group)])
    if b_scales is None:
        raise ValueError("LQER section holds no group scales for B")
    b_codes = _checked(b, b_bits, "B").reshape(-1)[:rank * cols].view(rank, cols)
    return LowRank(_checked(a, a_bits, "A"), torch.from_numpy(a_scale.copy()).reshape(()),
                   b_codes, torch.from_numpy(b_scales.astype(np.uint16).view(np.float16)),
                   a_bits, b_bits, group)


def pack_sections(tensors: dict, payload: list, breakdown: dict) -> list:
    """The artifact writer's part: each correction's section appended to `payload` and its bytes
    to its tensor's breakdown entry ("lqer"); returns the header's list of corrections."""
    corrections = []
    for name, t in tensors.items():
        if getattr(t, "lqer", None) is not None:
            blob = encode(t.lqer)
            payload.append(blob)
            breakdown[name]["lqer"] = len(blob)
            corrections.append([name, t.lqer.rank, t.lqer.a_bits, t.lqer.b_bits, t.lqer.group])
    return corrections


def well_formed(header: dict) -> bool:
    """A version 4 header's "lqer": [[name, rank, a_bits, b_bits, group], ...], each naming a
    plain quantized tensor once, with rank >= 1, grids of 2..8 bits and a group >= 1."""
    plain = {e[0] for e in header.get("tensors", []) if isinstance(e, list) and len(e) == 3
             and e[2] is not None}
    entries = header.get("lqer")

    def entry(e):
        return (isinstance(e, list) and len(e) == 5 and e[0] in plain
                and all(isinstance(v, int) for v in e[1:]) and e[1] >= 1
                and 2 <= e[2] <= 8 and 2 <= e[3] <= 8 and e[4] >= 1)

    return (isinstance(entries, list) and bool(entries) and all(map(entry, entries))
            and len({e[0] for e in entries}) == len(entries))


def attach(entries: list, blobs: list[bytes], tensors: dict) -> None:
    """The artifact reader's part: decode each listed correction onto its quantized tensor."""
    for (name, rank, a_bits, b_bits, group), blob in zip(entries, blobs, strict=True):
        codes = tensors[name].codes
        tensors[name].lqer = decode(blob, rows=codes.shape[0], cols=codes[0].numel(), rank=rank,
                                    a_bits=a_bits, b_bits=b_bits, group=group)
