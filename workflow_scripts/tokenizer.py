"""Tokenizer stage: train SentencePiece on the training documents, or take a provided model."""

from pathlib import Path

from pgolf.config import section
from pgolf.data.tokenizer import TokenizerConfig, build_tokenizer
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_tokenizer(
        section(TokenizerConfig, sm.params.tokenizer, "tokenizer"),
        docs=sm.input.get("docs"),
        corpus=sm.input.get("corpus"),
        val_docs=sm.params.val_docs,
        out=Path(sm.output.model),
        meta=Path(sm.output.meta),
        threads=sm.threads,
        model=sm.input.get("model"),
        provenance=provenance(sm, stage="tokenizer"),
    )
