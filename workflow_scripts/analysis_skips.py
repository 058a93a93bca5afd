"""Skips analysis: gates, weights against init, encoder share and ablation dBPB per skip."""

from pathlib import Path

from pgolf.analysis.skips import build_skips
from pgolf.analysis.windows import WindowsConfig
from pgolf.config import section
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_skips(
        *(Path(sm.input[k]) for k in ("model", "shards", "tokenizer")),
        Path(sm.output.table),
        Path(sm.output.plot),
        cfg=section(WindowsConfig, sm.params.windows, "analysis"),
        seq_len=sm.params.seq_len,
        provenance=provenance(sm, stage="analysis_skips"),
    )
