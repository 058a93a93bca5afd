"""Generation analysis: float vs each artifact on one shared random stream, teacher-forced KL."""

from pathlib import Path

from pgolf.analysis.generation import GenerationConfig, build_generation
from pgolf.config import section
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_generation(
        Path(sm.input.model),
        dict(zip(sm.params.policies, map(Path, sm.input.artifacts), strict=True)),
        Path(sm.input.shards),
        Path(sm.output.table),
        Path(sm.output.plot),
        cfg=section(GenerationConfig, sm.params.generation, "analysis.generation"),
        seq_len=sm.params.seq_len,
        provenance=provenance(sm, stage="analysis_generation"),
    )
