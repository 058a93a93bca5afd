"""Window scores: one difficulty score per non-overlapping training window, for the curriculum.

A window is tokens[start : start + seq_len + 1] with start = k * seq_len inside one train shard,
so the windows' targets never overlap (the loader reads the same windows). Scorers:
  unigram: mean surprisal (bits/token) of the window's tokens under the train unigram distribution;
  zstd:    compressed bytes / raw bytes of the window's decoded text.
"""

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import zstandard

from pgolf.data.shards import list_shards, read_shard, token_counts
from pgolf.io import atomic_path
from pgolf.provenance import Provenance

# pyarrow and tqdm are imported where used: the exported train_gpt.py ships this module
# without them.
SCORERS = ("unigram", "zstd")
TASK_WINDOWS = 4096  # windows per task: small enough to balance, large enough to vectorise


@dataclass(kw_only=True)
class ScoresConfig:
    scorer: str = "unigram"
    zstd_level: int = 3

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"scores.scorer: unknown scorer {self.scorer!r}; one of {SCORERS}")


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def unigram_surprisal(shards: list[Path], vocab_size: int) -> np.ndarray:
    """-log2 p(token) under the unigram distribution of the given shards (0 for unseen ids)."""
    counts = token_counts(shards, vocab_size)
    with np.errstate(divide="ignore"):
        bits = -np.log2(counts / counts.sum())
    return np.where(counts > 0, bits, 0.0)


def unigram_scores(tokens, first: int, last: int, seq_len: int, surprisal) -> np.ndarray:
    """Mean surprisal of windows first..last-1: row sums, plus each window's last token."""
    rows = np.asarray(tokens[first * seq_len:last * seq_len]).reshape(-1, seq_len)
    tails = np.asarray(tokens[(first + 1) * seq_len:(last + 1) * seq_len:seq_len])
    return (surprisal[rows].sum(axis=1) + surprisal[tails]) / (seq_len + 1)


def zstd_scores(tokens, first: int, last: int, seq_len: int, sp, level: int) -> np.ndarray:
    windows = [tokens[k * seq_len:(k + 1) * seq_len + 1].tolist() for k in range(first, last)]
    compressor = zstandard.ZstdCompressor(level=level)
    ratios = np.empty(len(windows))
    for i, text in enumerate(sp.decode(windows)):
        raw = text.encode("utf-8")
        ratios[i] = len(compressor.compress(raw)) / max(1, len(raw))
    return ratios


_worker: dict = {}


def _init_worker(scorer: str, seq_len: int, level: int, tokenizer: str, surprisal) -> None:
    sp = spm.SentencePieceProcessor(model_file=tokenizer) if scorer == "zstd" else None
    _worker.update(scorer=scorer, seq_len=seq_len, level=level, surprisal=surprisal, sp=sp)


def _score_task(task: tuple[str, int, int]) -> np.ndarray:
    path, first, last = task
    tokens, w = read_shard(path), _worker
    if w["scorer"] == "unigram":
        return unigram_scores(tokens, first, last, w["seq_len"], w["surprisal"])
    return zstd_scores(tokens, first, last, w["seq_len"], w["sp"], w["level"])


def window_scores(shard_dir: Path, tokenizer: Path, *, cfg: ScoresConfig, seq_len: int,
                  vocab_size: int, threads: int = 1, progress=lambda tasks, total: tasks) -> dict:
    """Every training window's shard name, start and score, as numpy arrays in shard order
    (no pyarrow: the exported train_gpt.py builds its curriculum with this)."""
    shards = list_shards(shard_dir, "train")
    if not shards:
        raise ValueError(f"shard folder {shard_dir}: no train shards to score")
    tasks = [(str(path), first, min(first + TASK_WINDOWS, n))
             for path in shards
             for n in [num_windows(len(read_shard(path)), seq_len)]
             for first in range(0, n, TASK_WINDOWS)]
    if not tasks:
        raise ValueError(f"train shards in {shard_dir} are shorter than one window of "
                         f"seq_len + 1 = {seq_len + 1} tokens")
    surprisal = unigram_surprisal(shards, vocab_size) if cfg.scorer == "unigram" else None
    init = (cfg.scorer, seq_len, cfg.zstd_level, str(tokenizer), surprisal)
    if threads > 1:
        with ProcessPoolExecutor(threads, initializer=_init_worker, initargs=init) as pool:
            parts = list(progress(pool.map(_score_task, tasks), len(tasks)))
    else:
        _init_worker(*init)
        parts = [_score_task(t) for t in progress(tasks, len(tasks))]
    return {"shard": np.array([Path(p).name for p, a, b in tasks for _ in range(b - a)]),
            "start": np.concatenate([np.arange(a, b) * seq_len for _, a, b in tasks]),
            "score": np.concatenate(parts)}


def score_windows(shard_dir: Path, tokenizer: Path, out: Path, *, cfg: ScoresConfig,
                  seq_len: int, vocab_size: int, threads: int = 1,
                  provenance: Provenance | None = None):
    """Score every training window of the train shards; write window_scores.parquet."""
    import pyarrow as pa
    from tqdm import tqdm

    windows = window_scores(shard_dir, tokenizer, cfg=cfg, seq_len=seq_len,
                            vocab_size=vocab_size, threads=threads,
                            progress=lambda tasks, total: tqdm(tasks, total=total, desc="score"))
    table = pa.table({"shard": pa.array(windows["shard"].tolist()).dictionary_encode(),
                      "start": windows["start"], "score": windows["score"]})
    meta = {"scorer": cfg.scorer, "seq_len": seq_len, "vocab_size": vocab_size,
            "provenance": provenance.record() if provenance else None}
    write_table(table, out, meta)
    return table


def write_table(table, out: Path, meta: dict) -> None:
    """Parquet with our metadata (JSON under the key b"pgolf"), written atomically."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({b"pgolf": json.dumps(meta).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def read_metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"pgolf"])
