"""Corpus stage: the configured source -> docs.jsonl + docs.json."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.corpus import CorpusConfig, build_corpus
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_corpus(
        section(CorpusConfig, sm.params.corpus, "corpus"),
        demo=Path(sm.input.get("demo", "")),
        out=Path(sm.output.docs),
        meta=Path(sm.output.meta),
        provenance=provenance(sm, stage="corpus"),
    )
