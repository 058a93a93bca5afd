"""Sensitivity stage: the per-matrix sweep tables of a seed in one table, and a plot."""

from pathlib import Path

from pgolf.quant.sweep import aggregate_sensitivity
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    aggregate_sensitivity(
        list(sm.input),
        Path(sm.output.table),
        Path(sm.output.plot),
        provenance=provenance(sm, stage="sensitivity"),
    )
