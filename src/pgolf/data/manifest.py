"""Curriculum manifest: equal-count score buckets over the training windows (0 = easiest)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.data.scores import read_metadata, write_table
from pgolf.io import write_json
from pgolf.provenance import Provenance

# pyarrow and matplotlib (pgolf.plot) are imported where used: the exported train_gpt.py
# ships this module without them.


@dataclass(kw_only=True)
class ManifestConfig:
    num_buckets: int = 8


def assign_buckets(score: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket b holds the windows of rank [b n / N, (b+1) n / N) by score: equal counts (+-1).

    Ranking instead of cutting at quantile values keeps the counts equal when scores tie; ties
    are broken by position (the order the windows are given in), so the result is deterministic.
    """
    n = len(score)
    if not 1 <= num_buckets <= min(n, 127):
        raise ValueError(f"manifest.num_buckets={num_buckets} must be in 1..{min(n, 127)} "
                         f"for {n} windows")
    order = np.argsort(score, kind="stable")
    bucket = np.empty(n, dtype=np.int8)
    bucket[order] = (np.arange(n) * num_buckets // n).astype(np.int8)
    return bucket


def bucket_edges(score: np.ndarray, bucket: np.ndarray, num_buckets: int) -> list[float]:
    """Lower score bound of buckets 1..N-1 (bucket 0 starts at the minimum)."""
    return [float(score[bucket == b].min()) for b in range(1, num_buckets)]


def build_manifest(scores_path: Path, out: Path, meta_out: Path, plot_out: Path | None = None, *,
                   cfg: ManifestConfig, provenance: Provenance | None = None) -> dict:
    """Write curriculum.parquet (shard, start, score, bucket), curriculum.json (edges, counts)
    and a histogram of the scores with the bucket edges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(scores_path)
    source = read_metadata(scores_path)
    score = table["score"].to_numpy()
    if not np.isfinite(score).all():
        raise ValueError(f"{scores_path}: {int((~np.isfinite(score)).sum())} non-finite scores")
    bucket = assign_buckets(score, cfg.num_buckets)
    edges = bucket_edges(score, bucket, cfg.num_buckets)
    summary = {
        "scorer": source["scorer"], "seq_len": source["seq_len"],
        "vocab_size": source["vocab_size"], "num_buckets": cfg.num_buckets,
        "windows": len(score), "edges": edges,
        "buckets": [_bucket_stats(score[bucket == b]) for b in range(cfg.num_buckets)],
        "provenance": provenance.record() if provenance else None,
    }
    keys = ("scorer", "seq_len", "vocab_size", "num_buckets", "edges")
    write_table(table.append_column("bucket", pa.array(bucket)), out, {k: summary[k] for k in keys})
    write_json(meta_out, summary)
    if plot_out is not None:
        plot_histogram(score, edges, plot_out, title=f"{source['scorer']} window scores")
    return summary


def _bucket_stats(s: np.ndarray) -> dict:
    return {"count": len(s), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}


def plot_histogram(score: np.ndarray, edges: list[float], out: Path, *, title: str) -> None:
    from pgolf.plot import figure

    with figure(out, size=(7, 3.5)) as ax:
        ax.hist(score, bins=100, color="#4c72b0")
        for edge in edges:
            ax.axvline(edge, color="#c44e52", lw=1)
        ax.set(title=f"{title}: {len(score)} windows, {len(edges) + 1} equal-count buckets",
               xlabel="score (lower = easier)", ylabel="windows")
