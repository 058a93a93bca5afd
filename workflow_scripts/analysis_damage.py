"""Damage analysis: each allocation's predicted dBPB beside the artifact's measured one."""

from pathlib import Path

from pgolf.analysis.damage import build_damage
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    files = zip(sm.input.allocations, sm.input.prequant, sm.input.roundtrip, strict=True)
    runs = {
        policy: dict(zip(("allocation", "prequant", "roundtrip"), map(Path, paths), strict=True))
        for policy, paths in zip(sm.params.policies, files, strict=True)
    }
    build_damage(
        runs,
        Path(sm.input.sensitivity),
        Path(sm.output.table),
        Path(sm.output.plot),
        provenance=provenance(sm, stage="analysis_damage"),
    )
