"""Sensitivity stage: sweep tables in one table, summaries, loop amplification, plots."""

from pathlib import Path

from pgolf.quant.sensitivity import aggregate_sensitivity
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    aggregate_sensitivity(
        list(sm.input.sweeps),
        Path(sm.input.groups),
        Path(sm.input.model),
        Path(sm.output.table),
        Path(sm.output.plot),
        Path(sm.output.groups_plot),
        provenance=provenance(sm, stage="sensitivity"),
    )
