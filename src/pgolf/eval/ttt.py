"""Score-first test-time training (R0409 `eval_val_ttt`; seed-techniques A6).

The validation targets are cut into chunks of chunk_tokens. Each chunk is first scored exactly as
`sliding` scores it (its own rows of the same window plan), then, unless it is the last, the model
trains on that chunk's tokens: consecutive seq_len sequences, `epochs` passes, SGD with momentum,
the learning rate on a cosine across chunks, gradients summed over ranks and clipped. So the model
that scores chunk c has seen only chunks 0..c-1 (C1 causal, C3 score before update), and every
target is scored once, in one pass (C4).
"""

import fnmatch
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.data.bytecount import ByteCounter
from pgolf.eval.sliding import (
    chunk_rows,
    chunk_totals,
    plan,
    rank_range,
    score_rows,
    scored_targets,
)
from pgolf.train.distributed import all_reduce


@dataclass(kw_only=True)
class TTTConfig:
    chunk_tokens: int = 32768  # targets per chunk: score them, then train on them
    epochs: int = 3
    lr: float = 0.005  # peak; chunk c trains at lr * (1 + cos(pi c / (C - 1))) / 2
    momentum: float = 0.9
    grad_clip: float = 1.0  # 0 = no clipping
    batch_seqs: int = 16  # sequences per optimizer step, over all ranks together
    params: list = field(default_factory=list)  # fnmatch patterns of trainable names; [] = all

    def __post_init__(self):
        for key in ("chunk_tokens", "epochs", "batch_seqs"):
            if getattr(self, key) < 1:
                raise ValueError(f"ttt.{key} = {getattr(self, key)}: must be >= 1")
        if self.lr < 0 or self.momentum < 0 or self.grad_clip < 0:
            raise ValueError(f"ttt: lr ({self.lr}), momentum ({self.momentum}) and grad_clip "
                             f"({self.grad_clip}) must be >= 0")


def lr_schedule(cfg: TTTConfig, num_chunks: int) -> list[float]:
    """The learning rate each chunk trains at: a cosine from lr to 0 across the chunks."""
    if num_chunks == 1:
        return [0.0]
    return [cfg.lr * 0.5 * (1 + math.cos(math.pi * c / (num_chunks - 1)))
            for c in range(num_chunks)]


def trainable(model: torch.nn.Module, patterns: list) -> list[torch.nn.Parameter]:
    """The parameters TTT adapts (all, or those whose names match a pattern); the rest freeze."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"ttt.params {unmatched} match no parameter; names look like "
                         f"{names[:4]}")
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(not patterns or any(fnmatch.fnmatch(name, p) for p in patterns))
        if param.requires_grad:
            chosen.append(param)
    return chosen


def sequence_starts(lo: int, hi: int, seq_len: int) -> np.ndarray:
    """Starts of the whole seq_len sequences whose targets lie in [lo, hi): the chunk's tokens."""
    return np.arange(lo, hi - seq_len + 1, seq_len)


def train_chunk(model, optimizer, params: list, stream: np.ndarray, starts: np.ndarray, *,
                cfg: TTTConfig, seq_len: int, device: torch.device, autocast: bool,
                rank: int, world: int) -> None:
    """`epochs` passes over the chunk's sequences, cfg.batch_seqs per step split across ranks.
    Each rank's loss is its share of the step's mean, so the summed gradient is the same for any
    number of ranks."""
    offsets = np.arange(seq_len)
    for p in params:  # a rank with no sequence in a step still all-reduces (zero) gradients
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for _ in range(cfg.epochs):
        for first in range(0, len(starts), cfg.batch_seqs):
            step = starts[first:first + cfg.batch_seqs]
            lo, hi = rank_range(len(step), rank, world)
            optimizer.zero_grad(set_to_none=False)
            if hi > lo:
                index = step[lo:hi, None] + offsets
                x = torch.from_numpy(stream[index]).to(device)
                y = torch.from_numpy(stream[index + 1]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    nll = model(x, y, reduction="none")
                (nll.float().sum() / (len(step) * seq_len)).backward()
            if world > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                all_reduce(flat)
                for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                    p.grad.copy_(g.view_as(p))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()


def ttt_bpb(model, stream: np.ndarray, counter: ByteCounter, *, cfg: TTTConfig, seq_len: int,
            stride: int, batch_seqs: int, device: torch.device, rank: int = 0, world: int = 1,
            max_tokens: int | None = None, autocast: bool = False) -> dict:
    """Score-first TTT over the roundtrip targets; the model's weights are adapted in place."""
    if cfg.chunk_tokens < seq_len:
        raise ValueError(f"ttt.chunk_tokens = {cfg.chunk_tokens}: must be >= the eval seq_len "
                         f"({seq_len}), the length of the sequences it trains on")
    num_targets = scored_targets(stream, seq_len, max_tokens)
    chunks = chunk_rows(plan(num_targets, seq_len, stride), num_targets, cfg.chunk_tokens)
    lrs = lr_schedule(cfg, len(chunks))
    params = trainable(model, cfg.params)
    optimizer = torch.optim.SGD(params, lr=lrs[0], momentum=cfg.momentum)
    sums = torch.zeros(len(chunks), 3, dtype=torch.float64, device=device)
    seconds = {"score": 0.0, "train": 0.0}
    for c, rows in enumerate(chunks):
        start = time.perf_counter()
        model.eval()
        lo, hi = rank_range(len(rows), rank, world)
        sums[c] = score_rows(model, stream, rows[lo:hi], counter, seq_len=seq_len,
                             batch_seqs=batch_seqs, device=device, autocast=autocast)
        seconds["score"] += time.perf_counter() - start
        if c == len(chunks) - 1:
            break  # nothing is left to score: training on the last chunk is wasted time
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lrs[c]
        model.train()
        chunk_lo = c * cfg.chunk_tokens
        train_chunk(model, optimizer, params, stream,
                    sequence_starts(chunk_lo, chunk_lo + cfg.chunk_tokens, seq_len), cfg=cfg,
                    seq_len=seq_len, device=device, autocast=autocast, rank=rank, world=world)
        seconds["train"] += time.perf_counter() - start
    model.eval()
    all_reduce(sums)
    return chunk_totals(sums, {"stride": stride, "lr_schedule": lrs,
                               "score_seconds": seconds["score"],
                               "train_seconds": seconds["train"]})
