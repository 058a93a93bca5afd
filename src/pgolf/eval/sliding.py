"""Sliding-window scoring: every target exactly once, each with up to seq_len - stride tokens of
context (upstream's stride-64 eval, R0409 `eval_val_sliding`).

Windows start at 0, stride, 2 stride, ...; the first scores all its targets, every later one only
its last `stride` (fewer at the end). The targets are the ones roundtrip scores, the stream cut to
whole windows of seq_len, so every mode is compared on identical targets and bytes, and with
stride = seq_len the windows are roundtrip's. (Upstream also scores the last < seq_len tail
targets, which roundtrip drops: a difference of under one window in millions of tokens.)
"""

import numpy as np
import torch

from pgolf.data.bytecount import ByteLUT, target_bytes
from pgolf.eval.bpb import totals
from pgolf.train.distributed import all_reduce


def plan(num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Rows (start, first scored, end) of target indices, end exclusive: the scored ranges of
    consecutive windows tile [0, num_targets) exactly once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"sliding stride = {stride}: must lie in 1..seq_len ({seq_len})")
    starts = np.arange(0, max(num_targets - (seq_len - stride), 0), stride)
    first = np.where(starts == 0, 0, starts + seq_len - stride)
    ends = np.minimum(starts + seq_len, num_targets)
    keep = first < ends  # a window whose scored range is empty adds nothing
    return np.stack([starts[keep], first[keep], ends[keep]], axis=1).astype(np.int64)


def scored_targets(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> int:
    """How many targets roundtrip scores: whole windows of seq_len (at most max_tokens)."""
    windows = (len(stream) - 1) // seq_len
    if max_tokens:
        windows = min(windows, max(1, max_tokens // seq_len))
    return windows * seq_len


def window_batch(stream: np.ndarray, rows: np.ndarray, seq_len: int):
    """Inputs, targets (padded to seq_len with token 0: causal attention keeps the padding out of
    every scored position) and the mask of scored positions, for a batch of plan rows."""
    offsets = np.arange(seq_len)
    index = np.minimum(rows[:, :1] + offsets, len(stream) - 2)
    lengths = rows[:, 2] - rows[:, 0]
    real = offsets < lengths[:, None]
    x = np.where(real, stream[index], 0)
    y = np.where(real, stream[index + 1], 0)
    scored = real & (offsets >= (rows[:, 1] - rows[:, 0])[:, None])
    return x, y, scored


@torch.no_grad()
def sliding_bpb(model, stream: np.ndarray, lut: ByteLUT, *, seq_len: int, stride: int,
                batch_seqs: int, device: torch.device, rank: int = 0, world: int = 1,
                max_tokens: int | None = None, autocast: bool = False) -> dict:
    """BPB over the roundtrip targets scored by sliding windows; ranks take contiguous windows."""
    rows = plan(scored_targets(stream, seq_len, max_tokens), seq_len, stride)
    lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    for first in range(lo, hi, batch_seqs):
        x, y, scored = window_batch(stream, rows[first:min(hi, first + batch_seqs)], seq_len)
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = model(xt, yt, reduction="none")
        mask = torch.from_numpy(scored).to(device)
        sums[0] += nll.double()[mask].sum()
        sums[1] += int(scored.sum())
        sums[2] += int(target_bytes(x[scored], y[scored], lut).sum())
    all_reduce(sums)
    return {**totals(float(sums[0]), int(sums[1]), int(sums[2])), "stride": stride,
            "windows": len(rows)}
