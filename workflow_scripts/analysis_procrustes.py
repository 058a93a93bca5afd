"""Procrustes analysis: same-type matrices across the layers of one model, against the null."""

from pathlib import Path

from pgolf.analysis.procrustes import ProcrustesConfig, build_procrustes_layers
from pgolf.config import section
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_procrustes_layers(
        Path(sm.input.model),
        Path(sm.output.table),
        Path(sm.output.plot),
        cfg=section(ProcrustesConfig, sm.params.procrustes, "analysis.procrustes"),
        provenance=provenance(sm, stage="analysis_procrustes"),
    )
