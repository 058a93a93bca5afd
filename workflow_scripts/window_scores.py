"""Window scores stage: train shards -> window_scores.parquet."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.scores import ScoresConfig, score_windows
from pgolf.io import read_json
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    score_windows(
        Path(sm.input.shards),
        Path(sm.input.tokenizer),
        Path(sm.output[0]),
        cfg=section(ScoresConfig, sm.params.scores, "scores"),
        seq_len=sm.params.seq_len,
        vocab_size=read_json(sm.input.meta)["vocab_size"],
        threads=sm.threads,
        provenance=provenance(sm, stage="window_scores"),
    )
