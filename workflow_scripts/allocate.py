"""Allocation stage: bits per quantizable tensor for one policy."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.allocate import AllocateConfig, build_allocation
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_allocation(
        Path(sm.input.model),
        sm.wildcards.policy,
        Path(sm.output[0]),
        cfg=section(AllocateConfig, sm.params.allocate, "allocate"),
        provenance=provenance(sm, stage="allocate"),
    )
