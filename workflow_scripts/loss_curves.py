"""Loss curves: training loss per step of every seed on one figure."""

from pathlib import Path

from pgolf.runplots import plot_loss_curves
from pgolf.stage import logged

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    seeds = list(sm.params.seeds)
    metrics = list(sm.input.metrics)
    if len(seeds) != len(metrics):
        raise ValueError(f"{len(metrics)} metrics files for {len(seeds)} seeds {seeds}")
    plot_loss_curves(dict(zip(seeds, map(Path, metrics), strict=True)), Path(sm.output[0]))
