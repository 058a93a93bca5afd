"""The GPTQ kernel: (W, H, bits, clip) -> (codes, scales), and round-to-nearest on the same grid.

Symmetric per-row grid: codes in [-qmax, qmax] with qmax = 2^(bits-1) - 1, one fp16 scale per row
from SDClip, s = k * std(row) / qmax (k = clip sigmas, per bit width and optionally per role:
mlp, attn, embed), with only an epsilon floor: the seed PRs' 1/qmax floor made every row with
small weights share one coarse step.

GPTQ (Frantar et al. 2022), in the paper's names: H = X^T X of the layer input; dead columns
(H_jj = 0) are zeroed; damping adds `damp * mean(diag H)` to the diagonal; act-order processes
columns by descending H_jj; Hinv is the upper Cholesky factor of H^-1; columns are quantized one
by one, each error scaled by 1/Hinv_jj and spread over the block's remaining columns, and the
block's errors update all later columns at once (lazy batch update). The result is kept only if
its Hessian-weighted error tr(dW H dW^T) is no larger than round-to-nearest's with the same
scales; otherwise the RTN codes are returned (GPTQ is greedy, not provably better on every input).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pgolf.quant.codec import qmax

SCALE_EPS = 1e-10


def sdclip_scales(W: torch.Tensor, *, bits: int, clip_sigmas: float) -> torch.Tensor:
    """One fp16 scale per row: clip_sigmas * std(row) / qmax, floored at a tiny epsilon only."""
    std = W.float().std(dim=1)
    return (clip_sigmas * std / qmax(bits)).clamp_min(SCALE_EPS).to(torch.float16)


def round_to_nearest(W: torch.Tensor, scale: torch.Tensor, *, bits: int) -> torch.Tensor:
    q = qmax(bits)
    return torch.clamp(torch.round(W.float() / scale.float()[:, None]), -q, q).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


def weighted_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - What) H (W - What)^T): the layer-output error on the calibration inputs."""
    dW = (W.float() - What.float())
    return float(((dW @ H.float()) * dW).sum())


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, clip_sigmas: float,
         block_size: int = 128, damp: float = 0.01,
         act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W (rows x cols) against H (cols x cols); returns int8 codes and fp16 row scales."""
    assert H.shape == (W.size(1), W.size(1)), (W.shape, H.shape)
    scale = sdclip_scales(W, bits=bits, clip_sigmas=clip_sigmas)
    W, H = prepare(W, H)
    rtn = round_to_nearest(W, scale, bits=bits)
    codes = _gptq_codes(W, H, scale.float(), bits=bits, block_size=block_size, damp=damp,
                        act_order=act_order)
    gptq_error = weighted_error(W, dequantize(codes, scale), H)
    if gptq_error > weighted_error(W, dequantize(rtn, scale), H):
        codes = rtn
    return codes, scale


def prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies with dead inputs handled: H_jj = 0 -> column j of W zeroed and H_jj = 1."""
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def upper_hinv(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Hinv: the upper Cholesky factor of (H + damp * mean(diag H) I)^-1."""
    H = H + damp * torch.diag(H).mean() * torch.eye(len(H), device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


Quantizer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, quantize: Quantizer, *,
              block_size: int) -> torch.Tensor:
    """GPTQ's column sweep (lazy batch updates) with a pluggable quantizer; W is updated in place.

    Columns are taken in W's order. `quantize(j, rest, d)` gets column j's position, the current
    (error-compensated) columns j.. of its block and diag(Hinv) over them, and returns column j's
    dequantized value; its error is spread over the later columns through Hinv row j. Returns
    the dequantized columns, in W's order. Freeze-dry and 2:4 plug in their own quantizers.
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


def _gptq_codes(W, H, s, *, bits, block_size, damp, act_order) -> torch.Tensor:
    q = qmax(bits)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    def nearest(j, rest, d):
        return torch.clamp(torch.round(rest[:, 0] / s), -q, q) * s

    # Values are codes times s exactly enough that dividing back and rounding recovers the codes.
    Q = torch.round(obs_sweep(W, upper_hinv(H, damp), nearest, block_size=block_size) / s[:, None])
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8)


ROLES = ("mlp", "attn", "embed")


def role(name: str | None) -> str | None:
    """The SDClip role of a checkpoint name, as the record splits k: embed (the embedding and an
    untied head), mlp, attn; None for anything else (or no name)."""
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "embed"
    for kind in ("mlp", "attn"):
        if name and f".{kind}." in name:
            return kind
    return None


def _by_width(table: dict, key: str) -> dict[int, float]:
    """YAML keys read "int6"; code asks by bit width."""
    out = {}
    for k, v in table.items():
        bits = int(str(k).removeprefix("int"))
        if not 2 <= bits <= 8 or not float(v) > 0:
            raise ValueError(f"{key}.{k} = {v!r}: expected int2..int8 and k > 0")
        out[bits] = float(v)
    return out


@dataclass(kw_only=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    # Clip sigmas k per bit width; the records use k = 12.85 for int6 matrices, 20 for int8.
    clip_sigmas: dict = None
    # Per role (mlp, attn, embed) and bit width, a k that overrides clip_sigmas for that role's
    # tensors (the record: mlp int6 11.5, attn int6 13.0, embed int7 14.0); {} = off.
    role_clip_sigmas: dict = field(default_factory=dict)
    # Per-tensor search: multipliers of k to try; the k with the least H-weighted error wins.
    clip_search: list = field(default_factory=list)

    def __post_init__(self):
        if self.clip_sigmas is None:
            self.clip_sigmas = {"int2": 3.0, "int3": 4.5, "int4": 6.5, "int5": 9.0,
                                "int6": 12.85, "int7": 16.0, "int8": 20.0}
        self.clip_sigmas = {int(str(k).removeprefix("int")): float(v)
                            for k, v in self.clip_sigmas.items()}
        unknown = sorted(set(self.role_clip_sigmas) - set(ROLES))
        if unknown:
            raise ValueError(f"gptq.role_clip_sigmas: unknown roles {unknown}; known: "
                             f"{list(ROLES)}")
        self.role_clip_sigmas = {r: _by_width(t, f"gptq.role_clip_sigmas.{r}")
                                 for r, t in self.role_clip_sigmas.items()}
        bad = [m for m in self.clip_search if not m > 0]
        if bad:
            raise ValueError(f"gptq.clip_search: multipliers must be > 0, got {bad}")

    def default_clip(self, bits: int, name: str | None = None) -> float:
        """k for `bits`: the role's override for the tensor `name` if set, else clip_sigmas."""
        override = self.role_clip_sigmas.get(role(name), {})
        if bits in override:
            return override[bits]
        if bits not in self.clip_sigmas:
            raise ValueError(f"gptq.clip_sigmas has no entry for {bits} bits")
        return self.clip_sigmas[bits]

    def quantize(self, W: torch.Tensor, H: torch.Tensor, bits: int,
                 clip_sigmas: float | None = None, name: str | None = None):
        """GPTQ at the given k, or at the configured k for `bits` (and `name`'s role)."""
        k = self.default_clip(bits, name) if clip_sigmas is None else clip_sigmas
        return gptq(W, H, bits=bits, clip_sigmas=k, block_size=self.block_size,
                    damp=self.damp, act_order=self.act_order)

    def search(self, W: torch.Tensor, H: torch.Tensor, bits: int, name: str | None = None):
        """(codes, scales, k): GPTQ at the configured k, or with a search the candidate k whose
        result has the least Hessian-weighted error (ties keep the configured k: it comes first)."""
        base = self.default_clip(bits, name)
        best = None
        for k in [base] + [base * m for m in self.clip_search if m != 1]:
            codes, scales = self.quantize(W, H, bits, k)
            error = weighted_error(W, dequantize(codes, scales), H) if self.clip_search else 0.0
            if best is None or error < best[0]:
                best = (error, codes, scales, k)
        return best[1:]
