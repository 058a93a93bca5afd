"""Exact BPB as upstream computes it: total NLL in bits over total UTF-8 bytes of the targets
(a ByteCounter says how many: the LUT rule, or the CaseOps sidecar).

Sums are float64 and all-reduced across ranks. The validation stream is truncated as upstream
truncates it: ((N - 1) // seq_len) * seq_len + 1 tokens, scored in non-overlapping windows.
"""

import math
from pathlib import Path

import numpy as np
import torch

from pgolf.data.bytecount import ByteCounter
from pgolf.data.shards import list_shards, read_shard
from pgolf.train.distributed import all_reduce


def val_stream(shard_dir: Path) -> np.ndarray:
    shards = list_shards(shard_dir, "val")
    if not shards:
        raise ValueError(f"{shard_dir}: no validation shards")
    return np.concatenate([read_shard(p) for p in shards]).astype(np.int64)


def totals(nll: float, tokens: int, num_bytes: int) -> dict:
    return {"loss": nll / tokens, "bpb": nll / math.log(2) / num_bytes, "tokens": tokens,
            "bytes": num_bytes, "nll_nats": nll}


def windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Inputs and targets (n, seq_len) of the non-overlapping windows: ((N - 1) // seq_len)
    windows, as upstream truncates the stream, or the first `max_windows` of them."""
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max(1, max_windows))
    return (stream[:n * seq_len].reshape(n, seq_len),
            stream[1:n * seq_len + 1].reshape(n, seq_len))


def window_positions(first: int, last: int, seq_len: int) -> np.ndarray:
    """Val-stream indices of the targets of non-overlapping windows first..last-1."""
    return np.arange(first * seq_len + 1, last * seq_len + 1).reshape(last - first, seq_len)


def _max_windows(max_tokens: int | None, seq_len: int) -> int | None:
    return max_tokens // seq_len if max_tokens else None


@torch.no_grad()
def evaluate(model, stream: np.ndarray, counter: ByteCounter, *, seq_len: int, batch_seqs: int,
             device: torch.device, rank: int = 0, world: int = 1, max_tokens: int | None = None,
             autocast: bool = False) -> dict:
    """Score non-overlapping windows of seq_len targets; ranks take contiguous window ranges."""
    X, Y = windows(stream, seq_len, _max_windows(max_tokens, seq_len))
    lo, hi = rank * len(X) // world, (rank + 1) * len(X) // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    for first in range(lo, hi, batch_seqs):
        last = min(hi, first + batch_seqs)
        x, y = X[first:last], Y[first:last]
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = model(xt, yt, reduction="none")
        sums[0] += nll.double().sum()
        sums[1] += y.size
        sums[2] += int(counter.target_bytes(x, y, window_positions(first, last, seq_len)).sum())
    all_reduce(sums)
    return totals(float(sums[0]), int(sums[1]), int(sums[2]))


def unigram_bpb(train_counts: np.ndarray, stream: np.ndarray, counter: ByteCounter, *,
                seq_len: int, max_tokens: int | None = None) -> dict:
    """The null baseline: the same targets scored by the train unigram distribution (add-one)."""
    x, y = windows(stream, seq_len, _max_windows(max_tokens, seq_len))
    p = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    nll = float(-np.log(p[y]).sum())
    num_bytes = counter.target_bytes(x, y, window_positions(0, len(y), seq_len)).sum()
    return totals(nll, y.size, int(num_bytes))
