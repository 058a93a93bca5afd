"""Allocation plots: bits and predicted dBPB per tensor per policy, and the artifacts' bytes."""

from pathlib import Path

from pgolf.runplots import plot_allocation, plot_bytes
from pgolf.stage import logged

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    policies = list(sm.params.policies)
    allocations = dict(zip(policies, map(Path, sm.input.allocations), strict=True))
    artifacts = dict(zip(policies, map(Path, sm.input.artifacts), strict=True))
    plot_allocation(allocations, Path(sm.output.allocation))
    plot_bytes(artifacts, Path(sm.output.bytes))
