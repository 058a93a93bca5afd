"""Loops analysis: contraction per pass of the looped block, float beside each artifact."""

from pathlib import Path

from pgolf.analysis.loops import LoopConfig, build_loops
from pgolf.analysis.windows import WindowsConfig
from pgolf.config import section
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_loops(
        Path(sm.input.model),
        dict(zip(sm.params.policies, map(Path, sm.input.artifacts), strict=True)),
        Path(sm.input.shards),
        Path(sm.input.tokenizer),
        Path(sm.output.table),
        Path(sm.output.plot),
        windows=section(WindowsConfig, sm.params.windows, "analysis"),
        cfg=section(LoopConfig, sm.params.loops, "analysis.loops"),
        seq_len=sm.params.seq_len,
        provenance=provenance(sm, stage="analysis_loops"),
    )
