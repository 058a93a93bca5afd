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

from pgolf.data.bytecount import ByteCounter
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


def target_positions(rows: np.ndarray, seq_len: int) -> np.ndarray:
    """Val-stream index of the target at each offset of these plan rows' windows."""
    return rows[:, :1] + np.arange(seq_len) + 1


def chunk_rows(rows: np.ndarray, num_targets: int, chunk_tokens: int) -> list[np.ndarray]:
    """The plan cut into chunks of chunk_tokens targets (the last may be shorter): a window whose
    scored range crosses a chunk edge is split in two, same start and context, so each chunk's
    rows score exactly its own targets."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens = {chunk_tokens}: must be >= 1")
    chunks = []
    for lo in range(0, num_targets, chunk_tokens):
        hi = min(lo + chunk_tokens, num_targets)
        part = rows[(rows[:, 1] < hi) & (rows[:, 2] > lo)].copy()
        part[:, 1] = np.maximum(part[:, 1], lo)
        part[:, 2] = np.minimum(part[:, 2], hi)
        chunks.append(part)
    return chunks


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share of n items."""
    return rank * n // world, (rank + 1) * n // world


@torch.no_grad()
def score_rows(model, stream: np.ndarray, rows: np.ndarray, counter: ByteCounter, *, seq_len: int,
               batch_seqs: int, device: torch.device, autocast: bool = False) -> torch.Tensor:
    """(nll nats, targets, bytes) in float64 over the scored positions of these plan rows."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for first in range(0, len(rows), batch_seqs):
        batch = rows[first:first + batch_seqs]
        x, y, scored = window_batch(stream, batch, seq_len)
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = model(xt, yt, reduction="none")
        sums[0] += nll.double()[torch.from_numpy(scored).to(device)].sum()
        sums[1] += int(scored.sum())
        positions = target_positions(batch, seq_len)[scored]
        sums[2] += int(counter.target_bytes(x[scored], y[scored], positions).sum())
    return sums


def chunk_totals(sums: torch.Tensor, extra: dict) -> dict:
    """The result of a chunked scoring pass: totals, and per chunk its nll, targets and bytes
    (what a paired comparison of two passes over the same chunks needs)."""
    total = sums.sum(0)
    per_chunk = {"nll_nats": sums[:, 0].tolist(), "tokens": sums[:, 1].long().tolist(),
                 "bytes": sums[:, 2].long().tolist()}
    return {**totals(float(total[0]), int(total[1]), int(total[2])), **extra,
            "chunks": per_chunk}


def sliding_bpb(model, stream: np.ndarray, counter: ByteCounter, *, seq_len: int, stride: int,
                batch_seqs: int, device: torch.device, rank: int = 0, world: int = 1,
                max_tokens: int | None = None, autocast: bool = False,
                chunk_tokens: int | None = None) -> dict:
    """BPB over the roundtrip targets scored by sliding windows, with per-chunk sums for chunks
    of chunk_tokens targets (one chunk if None); ranks take contiguous rows of each chunk."""
    num_targets = scored_targets(stream, seq_len, max_tokens)
    rows = plan(num_targets, seq_len, stride)
    chunks = chunk_rows(rows, num_targets, chunk_tokens or num_targets)
    sums = torch.zeros(len(chunks), 3, dtype=torch.float64, device=device)
    for c, part in enumerate(chunks):
        lo, hi = rank_range(len(part), rank, world)
        sums[c] = score_rows(model, stream, part[lo:hi], counter, seq_len=seq_len,
                             batch_seqs=batch_seqs, device=device, autocast=autocast)
    all_reduce(sums)
    return chunk_totals(sums, {"stride": stride, "windows": len(rows)})
