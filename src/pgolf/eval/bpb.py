"""Exact BPB as upstream computes it: total NLL in bits over total UTF-8 bytes of the targets.

Sums are float64 and all-reduced across ranks. The validation stream is truncated as upstream
truncates it: ((N - 1) // seq_len) * seq_len + 1 tokens, scored in non-overlapping windows.
"""

import math
from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards, read_shard
from pgolf.data.tokenizer import ByteLUT, target_bytes
from pgolf.train.distributed import all_reduce


def val_stream(shard_dir: Path) -> np.ndarray:
    shards = list_shards(shard_dir, "val")
    if not shards:
        raise ValueError(f"{shard_dir}: no validation shards")
    return np.concatenate([read_shard(p) for p in shards]).astype(np.int64)


def totals(nll: float, tokens: int, num_bytes: int) -> dict:
    return {"loss": nll / tokens, "bpb": nll / math.log(2) / num_bytes, "tokens": tokens,
            "bytes": num_bytes, "nll_nats": nll}


@torch.no_grad()
def evaluate(model, stream: np.ndarray, lut: ByteLUT, *, seq_len: int, batch_seqs: int,
             device: torch.device, rank: int = 0, world: int = 1, max_tokens: int | None = None,
             autocast: bool = False) -> dict:
    """Score non-overlapping windows of seq_len targets; ranks take contiguous window ranges."""
    n = (len(stream) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    lo, hi = rank * n // world, (rank + 1) * n // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    for first in range(lo, hi, batch_seqs):
        last = min(hi, first + batch_seqs)
        window = stream[first * seq_len:last * seq_len + 1]
        x = np.lib.stride_tricks.sliding_window_view(window[:-1], seq_len)[::seq_len]
        y = np.lib.stride_tricks.sliding_window_view(window[1:], seq_len)[::seq_len]
        xt, yt = torch.from_numpy(x.copy()).to(device), torch.from_numpy(y.copy()).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = model(xt, yt, reduction="none")
        sums[0] += nll.double().sum()
        sums[1] += y.size
        sums[2] += int(target_bytes(x, y, lut).sum())
    all_reduce(sums)
    return totals(float(sums[0]), int(sums[1]), int(sums[2]))


def unigram_bpb(train_counts: np.ndarray, stream: np.ndarray, lut: ByteLUT, *,
                seq_len: int, max_tokens: int | None = None) -> dict:
    """The null baseline: the same targets scored by the train unigram distribution (add-one)."""
    n = (len(stream) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    x, y = stream[:n * seq_len], stream[1:n * seq_len + 1]
    p = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    nll = float(-np.log(p[y]).sum())
    return totals(nll, len(y), int(target_bytes(x, y, lut).sum()))
