"""Training batches from memory-mapped shards: a shuffled sampler and the curriculum sampler.

Data comes from a fixed number of streams S. Stream s owns the train shards files[s::S] and an RNG
seeded by (seed, s). A step's global batch is one micro-batch from every stream; rank r of W reads
streams r, r+W, ... (one per gradient-accumulation micro-step). So the global batch does not depend
on the world size, and with S = W = 8 each rank owns its shards as upstream's loaders do.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.data.scores import read_metadata
from pgolf.data.shards import list_shards, read_shard

# pyarrow is imported where used: the exported train_gpt.py ships this module without it.
SAMPLERS = ("curriculum", "shuffled")


@dataclass(kw_only=True)
class LoaderConfig:
    sampler: str = "curriculum"
    streams: int = 8
    curriculum_floor: float = 0.02

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"train.loader.sampler={self.sampler!r}: one of {SAMPLERS}")


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, stream]))


def bucket_weights(num_buckets: int, progress: float, floor: float,
                   present: np.ndarray | None = None) -> np.ndarray:
    """P(bucket) = w_b / sum w with w_b = max(floor, (1 - d_b)(1 - p) + d_b p), d_b = b / (N - 1).

    A linear crossfade from easy-only (p = 0) to hard-only (p = 1); buckets absent from a stream
    get weight 0.
    """
    d = np.arange(num_buckets) / max(1, num_buckets - 1)
    p = min(max(progress, 0.0), 1.0)
    w = np.maximum(floor, (1 - d) * (1 - p) + d * p)
    if present is not None:
        w = np.where(present, w, 0.0)
    return w / w.sum()


class CurriculumStream:
    """Per sequence: a bucket drawn from bucket_weights, then a window uniformly inside it."""

    def __init__(self, windows: dict[str, np.ndarray], shards: dict[str, np.ndarray], *,
                 num_buckets: int, seq_len: int, floor: float, rng: np.random.Generator):
        self.shards, self.seq_len, self.floor, self.rng = shards, seq_len, floor, rng
        order = np.argsort(windows["bucket"], kind="stable")
        self.shard = windows["shard"][order]
        self.start = windows["start"][order]
        counts = np.bincount(windows["bucket"], minlength=num_buckets)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.counts, self.num_buckets = counts, num_buckets

    def draw(self, rows: int, progress: float) -> np.ndarray:
        p = bucket_weights(self.num_buckets, progress, self.floor, present=self.counts > 0)
        buckets = self.rng.choice(self.num_buckets, size=rows, p=p)
        picks = self.offsets[buckets] + (self.rng.random(rows) * self.counts[buckets]).astype(int)
        return np.stack([self.shards[self.shard[i]][self.start[i]:self.start[i] + self.seq_len + 1]
                         for i in picks])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class ShuffledStream:
    """Per epoch and shard: a random phase in [0, seq_len) and a random order of its windows; each
    sequence comes from a shard drawn with probability proportional to its remaining windows."""

    def __init__(self, shards: dict[str, np.ndarray], *, seq_len: int, rng: np.random.Generator):
        self.shards, self.seq_len, self.rng = shards, seq_len, rng
        self.names = sorted(shards)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.order = []
        for name in self.names:
            phase = int(self.rng.integers(self.seq_len))
            n = max(0, (len(self.shards[name]) - 1 - phase) // self.seq_len)
            self.order.append(phase + self.seq_len * self.rng.permutation(n))
        self.cursor = np.zeros(len(self.names), dtype=np.int64)

    def draw(self, rows: int, progress: float) -> np.ndarray:
        out = []
        for _ in range(rows):
            remaining = np.array([len(o) for o in self.order]) - self.cursor
            if remaining.sum() == 0:
                self._new_epoch()
                remaining = np.array([len(o) for o in self.order]) - self.cursor
            k = int(self.rng.choice(len(self.names), p=remaining / remaining.sum()))
            start = int(self.order[k][self.cursor[k]])
            self.cursor[k] += 1
            out.append(self.shards[self.names[k]][start:start + self.seq_len + 1])
        return np.stack(out)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cursor": self.cursor.tolist(),
                "order": [o.tolist() for o in self.order]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.cursor = np.array(state["cursor"], dtype=np.int64)
        self.order = [np.array(o, dtype=np.int64) for o in state["order"]]


def check_manifest(manifest: Path, *, seq_len: int, vocab_size: int) -> dict:
    """The manifest must describe windows of this run's seq_len over this vocabulary."""
    meta = read_metadata(manifest)
    if meta.get("seq_len") != seq_len:
        raise ValueError(f"curriculum manifest {manifest}: seq_len {meta.get('seq_len')} does not "
                         f"match train.seq_len={seq_len}")
    if meta.get("vocab_size") != vocab_size:
        raise ValueError(f"curriculum manifest {manifest}: vocab size {meta.get('vocab_size')} "
                         f"does not match model.vocab_size={vocab_size}")
    return meta


def read_manifest(manifest: Path, *, seq_len: int, vocab_size: int) -> dict:
    """The curriculum's windows (shard name, start, bucket arrays) and its bucket count."""
    import pyarrow.parquet as pq

    meta = check_manifest(manifest, seq_len=seq_len, vocab_size=vocab_size)
    table = pq.read_table(manifest, columns=["shard", "start", "bucket"]).to_pydict()
    return {**{k: np.asarray(v) for k, v in table.items()}, "num_buckets": meta["num_buckets"]}


def open_streams(cfg: LoaderConfig, *, shard_dir: Path, manifest: Path | dict | None,
                 seq_len: int, vocab_size: int, seed: int, streams: list[int]):
    """Build the given streams of this run (each owns train shards s::S). `manifest` is the
    curriculum's file or, as read_manifest returns it, its windows."""
    files = list_shards(shard_dir, "train")
    if len(files) < cfg.streams:
        raise ValueError(f"{shard_dir}: {len(files)} train shards cannot feed "
                         f"train.loader.streams={cfg.streams}; lower streams or shard_tokens")
    table = None
    if cfg.sampler == "curriculum":
        table = manifest if isinstance(manifest, dict) else read_manifest(
            manifest, seq_len=seq_len, vocab_size=vocab_size)
        num_buckets = table["num_buckets"]
        table = {k: table[k] for k in ("shard", "start", "bucket")}
    out = []
    for s in streams:
        owned = {p.name: read_shard(p) for p in files[s::cfg.streams]}
        rng = stream_rng(seed, s)
        if table is None:
            out.append(ShuffledStream(owned, seq_len=seq_len, rng=rng))
            continue
        keep = np.isin(table["shard"], list(owned))
        windows = {k: v[keep] for k, v in table.items()}
        out.append(CurriculumStream(windows, owned, num_buckets=num_buckets,
                                    seq_len=seq_len, floor=cfg.curriculum_floor, rng=rng))
    return out


def to_batch(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from windows of seq_len + 1 tokens: y is x shifted by one."""
    t = torch.from_numpy(windows.astype(np.int64))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]
