"""Per-matrix sensitivity: dBPB when only one matrix is quantized (GPTQ, each bit width).

Fast path: a matrix of physical layer i first acts at virtual position v (0 for the embedding).
Everything before v is unchanged, so the network state entering v is computed once per batch and
every bit width resumes from it. The deltas equal those of full evaluations (tests compare them).
The noise floor beside each delta is the standard error of the paired per-window differences:
the sampling noise of dBPB on this finite subset of validation windows.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.model.gpt import GPT, State, rms_norm
from pgolf.quant.artifact import encode_codes
from pgolf.quant.codec import compress_best, shuffle_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, round_to_nearest, weighted_error


@dataclass(kw_only=True)
class SweepConfig:
    bits: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    windows: int = 64  # validation windows of seq_len in the fixed sweep subset
    batch_seqs: int = 16


def first_position(model: GPT, name: str) -> int:
    """The first virtual layer whose computation reads the matrix `name` (0 for embeddings)."""
    if not name.startswith("blocks."):
        return 0
    layer = int(name.split(".")[1])
    return model.cfg.layer_sequence(model.looping).index(layer)


@torch.no_grad()
def window_nll(model: GPT, state: State, start: int, y: torch.Tensor) -> torch.Tensor:
    """Per-window NLL sums (nats) resuming the network at virtual position `start`."""
    depth = len(model.cfg.layer_sequence(model.looping))
    logits = model.logits(rms_norm(model.advance(state, start, depth).x))
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return nll.view(y.shape).double().sum(dim=1)


@torch.no_grad()
def sweep_matrix(model: GPT, name: str, H: torch.Tensor, batches: list, *, cfg: SweepConfig,
                 gptq: GPTQConfig, num_bytes: int) -> list[dict]:
    """One row per bit width: dBPB, its noise floor, compressed bytes, slope, H-weighted error."""
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    v = first_position(model, name)
    cached = [(model.advance(model.initial_state(x), 0, v) if v else None, x, y)
              for x, y in batches]

    def per_window() -> torch.Tensor:
        # An embedding change reaches the start state too, so it is recomputed from scratch.
        return torch.cat([window_nll(model, s if s is not None else model.initial_state(x), v, y)
                          for s, x, y in cached])

    base = per_window()
    rows = []
    for bits in cfg.bits:
        codes, scales = gptq.quantize(original, H, bits)
        param.copy_(dequantize(codes, scales).to(param.dtype))
        diff = (per_window() - base) / math.log(2) / num_bytes * len(base)
        param.copy_(original)
        size = len(encode_codes(codes.numpy(), bits)[1]) + len(compress_best(
            shuffle_bytes(scales.numpy().tobytes(), 2))[1])
        dbpb = float(diff.mean())
        rtn = round_to_nearest(original, scales, bits=bits)
        rows.append({"matrix": name, "bits": bits, "dbpb": dbpb,
                     "noise_se": float(diff.std(unbiased=True) / math.sqrt(len(diff))),
                     "bytes": size, "slope_dbpb_per_kb": dbpb / (size / 1000),
                     "weighted_error": weighted_error(original, dequantize(codes, scales), H),
                     "rtn_weighted_error": weighted_error(original, dequantize(rtn, scales), H),
                     "first_position": v, "windows": len(base)})
    return rows


def sweep_cost(model: GPT, names: list[str]) -> float:
    """Fraction of the naive cost (a full evaluation per matrix and bit width) the fast path
    spends, counted in virtual layers run, with the LM head as one more layer."""
    depth = len(model.cfg.layer_sequence(model.looping)) + 1
    spent = [depth if first_position(model, n) == 0 else depth - first_position(model, n)
             for n in names]
    return float(np.mean(spent)) / depth
