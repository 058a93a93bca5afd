"""Shards stage: tokenize docs.jsonl into upstream shards, or import an upstream shard folder."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.encode import ShardsConfig, build_shards
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_shards(
        section(ShardsConfig, sm.params.shards, "shards"),
        tokenizer=Path(sm.input.tokenizer),
        docs=sm.input.get("docs"),
        corpus=sm.input.get("corpus"),
        upstream=sm.input.get("upstream"),
        out_dir=Path(sm.output.shards),
        meta=Path(sm.output.meta),
        threads=sm.threads,
        caseops_on=sm.params.caseops,
        provenance=provenance(sm, stage="shards"),
    )
