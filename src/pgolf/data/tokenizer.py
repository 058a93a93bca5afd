"""SentencePiece tokenizer training with upstream's options, and the facts a sidecar records."""

import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from pgolf.data import caseops
from pgolf.data.bytecount import check_vocab_size, load_tokenizer
from pgolf.data.corpus import read_jsonl, val_split
from pgolf.io import read_json, write_bytes, write_json
from pgolf.provenance import Provenance

# Upstream's data/download_hf_docs_and_tokenize.py trainer arguments (parameter-golf.md 2.4).
UPSTREAM_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


@dataclass(kw_only=True)
class TokenizerConfig:
    vocab_size: int = 1024
    train_docs: int | None = None
    include_val: bool = False
    model: str | None = None
    character_coverage: float = 0.999
    max_sentence_length: int = 4192
    split_long_docs: bool = True
    input_sentence_size: int = 0
    caseops: bool = False  # train on CaseOps text, its control symbols reserved (data.caseops)


def training_sentences(docs: Iterable[str], *, max_bytes: int, split: bool) -> Iterator[str]:
    """Upstream's sentence iterator (NUL -> space, strip, skip empties), optionally split.

    SentencePiece silently skips sentences longer than max_sentence_length bytes; upstream feeds
    whole documents, so long ones never reach its trainer. With `split`, a long document is cut at
    spaces into pieces that fit, so all of its text is seen.
    """
    for doc in docs:
        text = doc.replace("\x00", " ").strip()
        if not text:
            continue
        if not split or len(text.encode("utf-8")) <= max_bytes:
            yield text
            continue
        yield from _pieces(text, max_bytes)


def _pieces(text: str, max_bytes: int) -> Iterator[str]:
    # Characters take at most 4 UTF-8 bytes, so max_bytes // 4 characters always fit.
    width = max(1, max_bytes // 4)
    start = 0
    while start < len(text):
        end = min(len(text), start + width)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        piece = text[start:end].strip()
        if piece:
            yield piece
        start = end


def train_tokenizer(docs: Iterable[str], out: str | Path, *, cfg: TokenizerConfig,
                    threads: int = 1) -> spm.SentencePieceProcessor:
    """Train a BPE model on `docs` with upstream's options; write it atomically to `out`.
    With cfg.caseops it trains on the CaseOps transform of the documents, the four control
    symbols reserved as user-defined pieces (upstream's reserve_text_transform_controls)."""
    check_vocab_size(cfg.vocab_size, where="tokenizer.vocab_size")
    if cfg.train_docs is not None:
        docs = itertools.islice(docs, cfg.train_docs)
    if cfg.caseops:  # before the sentence split, so the pieces the trainer sees fit its limit
        docs = map(caseops.encode, docs)
    sentences = training_sentences(docs, max_bytes=cfg.max_sentence_length,
                                   split=cfg.split_long_docs)
    first = next(sentences, None)
    if first is None:
        raise ValueError("tokenizer: no non-empty training documents")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], sentences),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        max_sentence_length=cfg.max_sentence_length,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=cfg.input_sentence_size > 0,
        num_threads=threads,
        minloglevel=1,
        **UPSTREAM_OPTIONS,
        **trainer_extras(cfg),
    )
    write_bytes(out, model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def trainer_extras(cfg: TokenizerConfig) -> dict:
    """Trainer arguments beyond upstream's defaults that the config asks for."""
    return {"user_defined_symbols": list(caseops.CONTROLS)} if cfg.caseops else {}


def describe(sp: spm.SentencePieceProcessor) -> dict:
    """The facts a sidecar should record about a tokenizer."""
    return {"vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
            "byte_pieces": int(sum(sp.is_byte(i) for i in range(sp.vocab_size())))}


def docs_for_training(docs: Iterable[str], *, val_docs: int, include_val: bool) -> Iterator[str]:
    """Upstream trains on the first documents of the file, val included; pgolf by default skips
    the first `val_docs` so that the tokenizer never sees validation text."""
    return iter(docs) if include_val else itertools.islice(docs, val_docs, None)


def build_tokenizer(cfg: TokenizerConfig, *, docs: str | None, corpus: str | None,
                    val_docs: int | None, out: Path, meta: Path, threads: int = 1,
                    model: str | None = None,
                    provenance: Provenance | None = None) -> spm.SentencePieceProcessor:
    """The tokenizer stage: copy a provided model (`model`, else tokenizer.model: the hub_shards
    source provides the one its shards were made with), or train one; write tokenizer.json."""
    model = model or cfg.model
    if model:
        sp = load_tokenizer(model, vocab_size=cfg.vocab_size)
        caseops.check_tokenizer(sp, caseops=cfg.caseops, where=f"tokenizer.model {model}")
        write_bytes(out, Path(model).read_bytes())
        trained_on = None
    else:
        split = val_split(val_docs, read_json(corpus))
        texts = docs_for_training(read_jsonl(docs), val_docs=split, include_val=cfg.include_val)
        sp = train_tokenizer(texts, out, cfg=cfg, threads=threads)
        trained_on = {"docs": str(docs), "skipped_val_docs": 0 if cfg.include_val else split,
                      "train_docs": cfg.train_docs,
                      "options": {**UPSTREAM_OPTIONS, **trainer_extras(cfg)}}
    extra = {"caseops": True} if cfg.caseops else {}  # today's tokenizer.json stays as it was
    write_json(meta, {**describe(sp), **extra, "trained_on": trained_on,
                      "provenance": provenance.record() if provenance else None})
    return sp
