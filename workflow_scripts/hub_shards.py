"""Hub shards stage: upstream's pre-tokenized shards and tokenizer from the hub, verified."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.hub import HubConfig
from pgolf.data.hub_shards import fetch_shards
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    fetch_shards(
        section(HubConfig, sm.params.hf, "corpus.hf"),
        out_dir=Path(sm.output.shards),
        tokenizer=Path(sm.output.tokenizer),
        meta=Path(sm.output.meta),
        vocab_size=sm.params.vocab_size,
        threads=sm.threads,
        provenance=provenance(sm, stage="hub_shards"),
    )
