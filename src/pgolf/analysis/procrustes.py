"""Orthogonal Procrustes between same-type matrices (seed-techniques B1, B2), next to its null.

For A, B (rows = outputs) the orthogonal R minimising ||A R - B|| comes from the SVD of A^T B =
U S V^T: R = U V^T (PR #1048 shipped V U^T, the transpose, and found ~0%). The statistic is the
MSE reduction 1 - ||A R - B||^2 / ||A - B||^2. Fitting n^2 rotation parameters to m n targets
reduces the error of *any* pair a lot (92% for i.i.d. Gaussian 512 x 1536), so the reduction
alone says nothing: it is reported beside the same statistic on at least 20 norm-matched random
pairs of the same shape, as the difference and a z-score.

The optimal residual is ||A||^2 + ||B||^2 - 2 ||A^T B||_* (nuclear norm), so the reduction needs
only singular values; for wide A (fewer outputs than inputs) they come from the small R-factors of
the QRs of A^T and B^T, which keeps a 512 x 2048 pair at a 512 x 512 SVD.
"""

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from pgolf.analysis.inputs import initial_state, matrices
from pgolf.analysis.table import write_analysis
from pgolf.plot import figure

DEFINITION = (
    "Orthogonal Procrustes between two matrices of one type and shape (rows = outputs): R = U V^T "
    "from the SVD of A^T B minimises ||A R - B||; reduction = 1 - ||A R - B||^2 / ||A - B||^2. "
    "Layer pairs: the same matrix type in two layers of one model; seed pairs: the same matrix "
    "in two seeds' models. excess = reduction - null_mean; z = excess / null_sd.")
NULL = (
    "null_mean and null_sd: the same reduction over `null_pairs` (at least 20) pairs of Gaussian "
    "matrices of the pair's shape with each matrix's row norms. Fitting a rotation reduces the "
    "error of any pair a lot (92% for i.i.d. 512 x 1536), so only the excess over this null, "
    "or its z-score, says anything about shared structure. init_reduction: the same pair in "
    "freshly initialised models, a second baseline: orthogonally initialised square matrices "
    "are exact rotations of each other (reduction 1) before any training.")


@dataclass(kw_only=True)
class ProcrustesConfig:
    pairs: int = 20  # random pairs in the null
    layer_pairs: str = "all"  # all | adjacent: which layer pairs of one model are compared

    def __post_init__(self):
        if self.layer_pairs not in ("all", "adjacent"):
            raise ValueError(f"analysis.procrustes.layer_pairs = {self.layer_pairs!r}: all or "
                             "adjacent")


def rotation(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising ||A R - B||_F."""
    U, _, Vh = torch.linalg.svd(A.T.double() @ B.double())
    return U @ Vh


def cross_nuclear_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||A^T B||_*, through the R-factors of A^T and B^T when A has fewer rows than columns."""
    if A.shape[0] < A.shape[1]:  # A^T B = Qa (Ra Rb^T) Qb^T with orthonormal Qa, Qb
        Ra, Rb = torch.linalg.qr(A.T, mode="r").R, torch.linalg.qr(B.T, mode="r").R
        return torch.linalg.svdvals(Ra @ Rb.T).sum()
    return torch.linalg.svdvals(A.T @ B).sum()


def reduction(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor | None = None) -> float:
    """1 - ||A R - B||^2 / ||A - B||^2 for the optimal R (or the one given); NaN when A = B,
    where there is nothing to reduce."""
    A, B = A.double(), B.double()
    before = (A - B).square().sum()
    if before == 0:
        return float("nan")
    if R is None:
        residual = A.square().sum() + B.square().sum() - 2 * cross_nuclear_norm(A, B)
    else:
        residual = (A @ R.double() - B).square().sum()
    return float(1 - residual / before)


def matched_random(W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian matrix of W's shape with W's row norms: the null keeps the marginals that a
    rotation of the inputs cannot change."""
    G = torch.randn(W.shape, generator=generator, dtype=torch.float64)
    return G * (W.double().norm(dim=1, keepdim=True) / G.norm(dim=1, keepdim=True))


def against_null(A: torch.Tensor, B: torch.Tensor, *, pairs: int = 20, seed: int = 0) -> dict:
    """The observed reduction, the null distribution's mean and SD over `pairs` random pairs
    matched to A's and B's shapes and row norms, their difference and the z-score."""
    if A.shape != B.shape:
        raise ValueError(f"Procrustes needs matrices of one shape, got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if pairs < 20:
        raise ValueError(f"procrustes null: {pairs} random pairs; at least 20 are needed")
    generator = torch.Generator().manual_seed(seed)
    null = np.array([reduction(matched_random(A, generator), matched_random(B, generator))
                     for _ in range(pairs)])
    observed = reduction(A, B)
    sd = float(null.std(ddof=1))
    return {"reduction": observed, "null_mean": float(null.mean()), "null_sd": sd,
            "null_pairs": pairs, "excess": observed - float(null.mean()),
            "z": (observed - float(null.mean())) / sd if sd > 0 else float("nan")}


def matrix_type(name: str) -> str:
    """blocks.3.mlp.fc.weight -> mlp.fc (the layer index dropped)."""
    parts = name.split(".")
    return ".".join(parts[2:-1]) if parts[0] == "blocks" else ".".join(parts[:-1])


def layer_table(state: dict[str, torch.Tensor], names: list[str], *, cfg: ProcrustesConfig,
                init: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Every pair of layers (or adjacent ones) per matrix type, each against its null and, given
    the initial weights, against the same pair at initialisation."""
    by_type: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("blocks."):
            by_type.setdefault(matrix_type(name), []).append(name)
    rows = []
    for kind, members in by_type.items():
        pairs = list(zip(members, members[1:], strict=False)) if cfg.layer_pairs == "adjacent" \
            else list(combinations(members, 2))
        for a, b in pairs:
            result = against_null(state[a], state[b], pairs=cfg.pairs, seed=len(rows))
            start = reduction(init[a], init[b]) if init else float("nan")
            rows.append({"type": kind, "a": a, "b": b, **result, "init_reduction": start})
    return rows


def seed_table(states: dict[int, dict[str, torch.Tensor]], names: list[str], *,
               cfg: ProcrustesConfig, inits: dict[int, dict] | None = None) -> list[dict]:
    """The same matrix across every pair of seeds, each against its null (and, given each seed's
    initial weights, against the same pair at initialisation)."""
    rows = []
    for (seed_a, a), (seed_b, b) in combinations(sorted(states.items()), 2):
        for name in names:
            result = against_null(a[name], b[name], pairs=cfg.pairs, seed=len(rows))
            start = reduction(inits[seed_a][name], inits[seed_b][name]) if inits \
                else float("nan")
            rows.append({"type": matrix_type(name), "matrix": name, "seed_a": seed_a,
                         "seed_b": seed_b, **result, "init_reduction": start})
    return rows


def plot_procrustes(rows: list[dict], out: Path, *, label: str) -> None:
    """Observed reduction against the null's mean and 2-SD band, per pair, grouped by type."""
    with figure(out, size=(max(6.0, 0.22 * len(rows) + 2), 4)) as ax:
        x = np.arange(len(rows))
        null = np.array([r["null_mean"] for r in rows])
        band = 2 * np.array([r["null_sd"] for r in rows])
        ax.fill_between(x, null - band, null + band, color="grey", alpha=0.3,
                        label="null mean +- 2 SD", step="mid")
        ax.scatter(x, [r["reduction"] for r in rows], s=14, color="tab:red", label="observed",
                   zorder=3)
        ax.scatter(x, [r["init_reduction"] for r in rows], s=10, marker="x", color="tab:blue",
                   label="same pair at init", zorder=2)
        types = [r["type"] for r in rows]
        starts = [i for i, t in enumerate(types) if i == 0 or types[i - 1] != t]
        ax.set_xticks(starts, [types[i] for i in starts], rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="MSE reduction by the best rotation", title=f"Procrustes, {label}")
        ax.legend(fontsize=8)


def build_procrustes_layers(model_path: Path, table: Path, plot: Path, *,
                            cfg: ProcrustesConfig, provenance=None) -> list[dict]:
    state, names = matrices(model_path)
    rows = layer_table(state, names, cfg=cfg, init=initial_state(model_path, 0))
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance)
    plot_procrustes(rows, plot, label="layer pairs of one model")
    return rows


def build_procrustes_seeds(model_paths: dict[int, Path], table: Path, plot: Path, *,
                           cfg: ProcrustesConfig, provenance=None) -> list[dict]:
    loaded = {seed: matrices(path) for seed, path in model_paths.items()}
    names = next(iter(loaded.values()))[1]
    if any(found != names for _, found in loaded.values()):
        raise ValueError(f"cross-seed Procrustes needs one architecture: {list(model_paths)} "
                         "differ in their quantizable matrices")
    inits = {seed: initial_state(path, seed) for seed, path in model_paths.items()}
    rows = seed_table({s: state for s, (state, _) in loaded.items()}, names, cfg=cfg,
                      inits=inits)
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance)
    plot_procrustes(rows, plot, label="one matrix across seeds")
    return rows
