"""Loop contraction: how much each pass of the looped (depth-recurrent) layers moves the stream.

The looped segment of a GPT runs num_loops + 1 times. If the passes act like a contracting
fixed-point iteration, each pass changes the residual stream by a roughly constant fraction r of
the previous pass's change, and r^K predicts what one more pass would still add. The network's own
passes (with whatever U-Net skips it mixes in between them) are set beside a "pure" iteration of
the looped blocks alone from the same starting stream, and every change and ratio carries a
bootstrap interval over evaluation windows.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.analysis.artifacts import quantized_models
from pgolf.analysis.table import write_analysis
from pgolf.analysis.windows import WindowsConfig, model_subset
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.plot import figure

DEFINITION = (
    "A pass is one contiguous run of the looped physical layers loop_start..loop_end in the "
    "virtual layer sequence (passes start at virtual positions loop_start + i * (loop_end - "
    "loop_start + 1), i = 0..num_loops). h_0 is the residual stream entering the first pass and "
    "h_k the stream after pass k's last block, both taken from GPT.advance at pass boundaries, so "
    "a pass whose positions lie in the decoder half includes the U-Net skip addition (or gated "
    "lerp) applied before each of its blocks. delta (Delta_k) is the mean over tokens of "
    "||h_k - h_{k-1}||_2, computed per window (one sequence) and averaged over windows with equal "
    "weight (the token mean when all windows have one length); rel_delta = Delta_k / mean "
    "||h_{k-1}||_2. ratio on pass k is r_{k-1} = Delta_k / Delta_{k-1} (NaN on pass 1); "
    "geo_mean_ratio r is the geometric mean of the K - 1 ratios, which telescopes to "
    "(Delta_K / Delta_1)^(1/(K-1)); predicted_next = r^K is the predicted Delta_{K+1} / Delta_1 "
    "under geometric decay Delta_k = Delta_1 r^(k-1): what one more pass would change, relative "
    "to the first pass's change. kind 'network' has the model's K = num_loops + 1 passes; kind "
    "'pure' starts from the same h_0 and applies only the looped blocks, block(x, x0) in order "
    "with x0 the embedding stream, K = iterations times with no skips: the contraction of the "
    "looped map towards its fixed point.")
NULL = (
    "The noise floor is the spread over evaluation windows: delta_se is the SE over windows of "
    "Delta_k, and [delta_lo, delta_hi], [ratio_lo, ratio_hi] and [geo_mean_lo, geo_mean_hi] are "
    "95% percentile bootstrap intervals from resampling windows with replacement (a resample's "
    "ratio is the ratio of its resampled mean Deltas, fixed seed), so a ratio below 1 or a "
    "difference between variants counts only beyond these intervals.")


@dataclass(kw_only=True)
class LoopConfig:
    iterations: int = 6  # pure-iteration passes
    bootstrap: int = 1000  # window resamples for the 95% intervals
    seed: int = 0  # of the bootstrap's numpy Generator, so tables are reproducible

    def __post_init__(self):
        if self.iterations < 2:
            raise ValueError(f"loops.iterations={self.iterations}: need >= 2 passes for a ratio")
        if self.bootstrap < 1:
            raise ValueError(f"loops.bootstrap={self.bootstrap}: need >= 1 resample")


def pass_starts(cfg: GPTConfig, looping: bool) -> list[int]:
    """Virtual positions where each pass of the looped segment begins."""
    if not (looping and cfg.num_loops):
        raise ValueError(
            f"model has no looped layers: num_loops={cfg.num_loops}, loop_start={cfg.loop_start}, "
            f"loop_end={cfg.loop_end}, looping={looping}; loop contraction needs num_loops >= 1 "
            "with looping switched on")
    width = cfg.loop_end - cfg.loop_start + 1
    starts = [cfg.loop_start + i * width for i in range(cfg.num_loops + 1)]
    sequence, segment = cfg.layer_sequence(looping), list(range(cfg.loop_start, cfg.loop_end + 1))
    assert all(sequence[s:s + width] == segment for s in starts), "passes must tile the loop"
    return starts


def _network_streams(model: GPT, idx: torch.Tensor, starts: list[int]) -> Iterator[torch.Tensor]:
    """h_0, then the stream after each pass, as the network itself computes it (skips included)."""
    width = model.cfg.loop_end - model.cfg.loop_start + 1
    state = model.advance(model.initial_state(idx), 0, starts[0])
    yield state.x
    for start in starts:
        state = model.advance(state, start, start + width)
        yield state.x


def _pure_streams(model: GPT, idx: torch.Tensor, starts: list[int],
                  iterations: int) -> Iterator[torch.Tensor]:
    """h_0, then the stream after each of `iterations` applications of the looped blocks alone."""
    state = model.advance(model.initial_state(idx), 0, starts[0])
    x, x0 = state.x, state.x0
    yield x
    looped = [model.blocks[i] for i in range(model.cfg.loop_start, model.cfg.loop_end + 1)]
    for _ in range(iterations):
        for block in looped:
            x = block(x, x0, state.mask)
        yield x


def _window_changes(streams: Iterator[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per window and pass (B, K): token means of ||h_k - h_{k-1}|| and of ||h_{k-1}||."""
    deltas, bases = [], []
    previous = next(streams).double()  # float64 so late, small changes keep their digits
    for h in streams:
        h = h.double()
        deltas.append((h - previous).norm(dim=-1).mean(dim=-1))
        bases.append(previous.norm(dim=-1).mean(dim=-1))
        previous = h
    return torch.stack(deltas, 1).cpu().numpy(), torch.stack(bases, 1).cpu().numpy()


def _resampled_means(values: np.ndarray, cfg: LoopConfig) -> np.ndarray:
    """(bootstrap, K) column means over windows drawn with replacement. One draw serves every
    column, so a ratio of two columns is the ratio of one resample's means."""
    windows = len(values)
    counts = np.random.default_rng(cfg.seed).multinomial(
        windows, np.full(windows, 1 / windows), size=cfg.bootstrap)
    return counts @ values / windows


def _interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return lo, hi


def _kind_rows(deltas: np.ndarray, bases: np.ndarray, *, cfg: LoopConfig, variant: str,
               kind: str) -> list[dict]:
    """The rows of one kind from its per-window changes (windows, K)."""
    windows, K = deltas.shape
    delta, base = deltas.mean(axis=0), bases.mean(axis=0)
    se = deltas.std(axis=0, ddof=1) / math.sqrt(windows) if windows > 1 else np.full(K, np.nan)
    boot = _resampled_means(deltas, cfg)
    # a pass that changes nothing (e.g. identity blocks at init) gives 0/0: NaN, not a warning
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.concatenate([[np.nan], delta[1:] / delta[:-1]])
        boot_ratio = np.concatenate([np.full((len(boot), 1), np.nan),
                                     boot[:, 1:] / boot[:, :-1]], axis=1)
        geo = (delta[-1] / delta[0]) ** (1 / (K - 1))
        boot_geo = (boot[:, -1] / boot[:, 0]) ** (1 / (K - 1))
        rel = delta / base
    lo, hi = _interval(boot)
    ratio_lo, ratio_hi = _interval(boot_ratio)
    geo_lo, geo_hi = _interval(boot_geo)
    shared = {"geo_mean_ratio": float(geo), "geo_mean_lo": float(geo_lo),
              "geo_mean_hi": float(geo_hi), "predicted_next": float(geo ** K),
              "windows": windows}
    return [{"variant": variant, "kind": kind, "pass": k + 1, "delta": float(delta[k]),
             "delta_se": float(se[k]), "delta_lo": float(lo[k]), "delta_hi": float(hi[k]),
             "rel_delta": float(rel[k]), "ratio": float(ratio[k]),
             "ratio_lo": float(ratio_lo[k]), "ratio_hi": float(ratio_hi[k]), **shared}
            for k in range(K)]


@torch.no_grad()
def loop_rows(model: GPT, batches: list[torch.Tensor], *, cfg: LoopConfig,
              variant: str) -> list[dict]:
    """Rows for one model (variant = 'float' or a policy name): one row per (kind, pass k) with
    kind in {'network', 'pure'}, columns: variant, kind, pass, delta, delta_se, delta_lo,
    delta_hi, rel_delta, ratio (r_{k-1} = Delta_k/Delta_{k-1}, NaN for k=1), ratio_lo, ratio_hi,
    plus geo_mean_ratio, geo_mean_lo, geo_mean_hi and predicted_next (same value on every row of
    the kind) and windows. The model runs in its own dtype; norms are taken in float64."""
    starts = pass_starts(model.cfg, model.looping)
    if not batches:
        raise ValueError("loop_rows needs at least one token batch")
    device = next(model.parameters()).device
    per_kind: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"network": [], "pure": []}
    for batch in batches:
        if batch.ndim != 2:
            raise ValueError(f"token batches must be (B, T), got shape {tuple(batch.shape)}")
        idx = batch.to(device)
        per_kind["network"].append(_window_changes(_network_streams(model, idx, starts)))
        per_kind["pure"].append(_window_changes(_pure_streams(model, idx, starts,
                                                              cfg.iterations)))
    rows = []
    for kind, parts in per_kind.items():
        deltas = np.concatenate([d for d, _ in parts])
        bases = np.concatenate([b for _, b in parts])
        rows += _kind_rows(deltas, bases, cfg=cfg, variant=variant, kind=kind)
    return rows


def plot_loops(rows: list[dict], out: Path) -> None:
    """Delta_k against pass k on a log axis, one line per (variant, kind), with the bootstrap
    intervals as error bars; pure iteration dashed."""
    if not rows:
        raise ValueError("plot_loops needs at least one row")
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["kind"]), []).append(row)
    with figure(Path(out), size=(7.0, 4.5)) as ax:
        for (variant, kind), group in groups.items():
            group = sorted(group, key=lambda r: r["pass"])
            delta = np.array([r["delta"] for r in group])
            # clipped: matplotlib refuses negative bar lengths, which rounding could produce
            below = np.clip(delta - np.array([r["delta_lo"] for r in group]), 0, None)
            above = np.clip(np.array([r["delta_hi"] for r in group]) - delta, 0, None)
            ax.errorbar([r["pass"] for r in group], delta, yerr=[below, above], marker="o",
                        capsize=3, linestyle="-" if kind == "network" else "--",
                        label=f"{variant} ({kind}, r={group[0]['geo_mean_ratio']:.3g})")
        ax.set_yscale("log")
        ax.set_xlabel("pass k")
        ax.set_ylabel("Delta_k = mean ||h_k - h_{k-1}||")
        ax.set_title("Loop contraction (95% bootstrap intervals over windows)")
        ax.legend(fontsize=8)


def build_loops(model_path: Path, artifacts: dict[str, Path], shards: Path, tokenizer: Path,
                table: Path, plot: Path, *, windows: WindowsConfig, cfg: LoopConfig,
                seq_len: int, provenance=None) -> list[dict]:
    """The float model's loop contraction beside each quantized artifact's."""
    model, subset = model_subset(model_path, shards, tokenizer, cfg=windows, seq_len=seq_len)
    batches = [x for x, _ in subset.batches]
    variants = {"float": model, **quantized_models(artifacts)}
    rows = [row for name, m in variants.items()
            for row in loop_rows(m, batches, cfg=cfg, variant=name)]
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance)
    plot_loops(rows, plot)
    return rows

