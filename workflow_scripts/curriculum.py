"""Curriculum stage: window scores -> equal-count buckets, edges and a histogram."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.manifest import ManifestConfig, build_manifest
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_manifest(
        Path(sm.input[0]),
        Path(sm.output.manifest),
        Path(sm.output.meta),
        Path(sm.output.plot),
        cfg=section(ManifestConfig, sm.params.manifest, "manifest"),
        provenance=provenance(sm, stage="curriculum"),
    )
