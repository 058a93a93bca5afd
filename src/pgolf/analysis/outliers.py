"""Per-tensor outlier statistics (seed-techniques B5), each next to the same statistic of Gaussian
matrices of the tensor's shape: the null a heavy tail must be read against.

Excess kurtosis over all elements (0 for a Gaussian); outlier rows and columns, whose L2 norm
exceeds the mean + 3 SD of the norms; outlier elements, |w| > mean|w| + 3 SD|w|. A 3-SD rule
flags rows and elements of a perfectly Gaussian matrix too, so the null's values are reported
beside each statistic (the mean over `draws` Gaussian matrices, and their SD).
"""

from pathlib import Path

import numpy as np
import torch

from pgolf.analysis.inputs import matrices
from pgolf.analysis.table import write_analysis
from pgolf.plot import figure

DEFINITION = (
    "Per quantizable matrix: excess kurtosis of all elements; outlier rows and columns (L2 norm "
    "> mean + 3 SD of the norms) as counts; the fraction of elements with |w| > mean|w| + 3 "
    "SD|w|; max|w| / SD.")
NULL = (
    "Each *_null column is the mean of the same statistic over Gaussian matrices of the tensor's "
    "shape (its SD over the draws in *_null_sd): a 3-SD rule flags rows and elements of a "
    "Gaussian matrix too, so a statistic is notable only as far as it departs from its null.")
STATISTICS = ("excess_kurtosis", "outlier_rows", "outlier_cols", "outlier_elements", "max_over_sd")


def statistics(W: torch.Tensor, threshold: float = 3.0) -> dict:
    """The outlier statistics of one 2-D tensor."""
    W = W.double().reshape(W.shape[0], -1)
    centred = W - W.mean()
    sd = centred.square().mean().sqrt()
    kurtosis = float(centred.pow(4).mean() / sd.pow(4) - 3) if sd > 0 else 0.0

    def flagged(values: torch.Tensor) -> torch.Tensor:
        return values > values.mean() + threshold * values.std()
    rows, cols, mags = W.norm(dim=1), W.norm(dim=0), W.abs().flatten()
    return {"excess_kurtosis": kurtosis, "outlier_rows": int(flagged(rows).sum()),
            "outlier_cols": int(flagged(cols).sum()),
            "outlier_elements": float(flagged(mags).double().mean()),
            "max_over_sd": float(W.abs().max() / sd) if sd > 0 else 0.0}


def gaussian_null(shape: tuple, *, draws: int = 8, seed: int = 0) -> dict:
    """Mean and SD of each statistic over `draws` Gaussian matrices of `shape`."""
    generator = torch.Generator().manual_seed(seed)
    samples = [statistics(torch.randn(shape, generator=generator, dtype=torch.float64))
               for _ in range(draws)]
    out = {}
    for key in STATISTICS:
        values = np.array([s[key] for s in samples], dtype=np.float64)
        out[f"{key}_null"] = float(values.mean())
        out[f"{key}_null_sd"] = float(values.std(ddof=1))
    return out


def outlier_table(state: dict[str, torch.Tensor], names: list[str], *, draws: int = 8) -> list:
    """One row per named matrix: its statistics, then the null's."""
    nulls: dict[tuple, dict] = {}
    rows = []
    for name in names:
        W = state[name]
        shape = (W.shape[0], int(np.prod(W.shape[1:])))
        if shape not in nulls:
            nulls[shape] = gaussian_null(shape, draws=draws)
        rows.append({"tensor": name, "rows": shape[0], "cols": shape[1], **statistics(W),
                     **nulls[shape]})
    return rows


def plot_outliers(rows: list[dict], out: Path) -> None:
    """Excess kurtosis and outlier-element fraction per tensor, each beside its Gaussian null."""
    y = np.arange(len(rows))
    with figure(out, size=(10, max(4.0, 0.28 * len(rows) + 1.5)), panels=2) as axes:
        for ax, key, label in zip(axes, ("excess_kurtosis", "outlier_elements"),
                                  ("excess kurtosis", "fraction of outlier elements"),
                                  strict=True):
            ax.barh(y, [r[key] for r in rows], color="tab:blue", label="trained")
            ax.errorbar([r[f"{key}_null"] for r in rows], y,
                        xerr=[2 * r[f"{key}_null_sd"] for r in rows], fmt="|", color="black",
                        capsize=2, label="Gaussian null +- 2 SD")
            ax.set(xlabel=label)
            ax.set_yticks(y, [] if ax is axes[1] else
                          [r["tensor"].removesuffix(".weight") for r in rows], fontsize=7)
            ax.invert_yaxis()
            ax.legend(fontsize=8)


def build_outliers(model_path: Path, table: Path, plot: Path, *, draws: int,
                   provenance=None) -> list[dict]:
    state, names = matrices(model_path)
    rows = outlier_table(state, names, draws=draws)
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance,
                   draws=draws)
    plot_outliers(rows, plot)
    return rows
