"""Cross-seed Procrustes: each matrix across every pair of seeds, against the null."""

from pathlib import Path

from pgolf.analysis.procrustes import ProcrustesConfig, build_procrustes_seeds
from pgolf.config import section
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_procrustes_seeds(
        dict(zip(sm.params.seeds, map(Path, sm.input.models), strict=True)),
        Path(sm.output.table),
        Path(sm.output.plot),
        cfg=section(ProcrustesConfig, sm.params.procrustes, "analysis.procrustes"),
        provenance=provenance(sm, stage="analysis_procrustes_seeds"),
    )
