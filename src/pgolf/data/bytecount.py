"""Byte accounting for BPB: the UTF-8 bytes each predicted token stands for, as upstream counts
them, and loading the tokenizer they come from. Evaluation needs only this, not the trainer."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import MAX_VOCAB
from pgolf.io import require_file


def load_tokenizer(path: str | Path, *,
                   vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Load a .model file and check it can write upstream shards (uint16 ids, a BOS id)."""
    path = require_file(path, "tokenizer model")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"tokenizer model {path}: not a SentencePiece model ({err})") from None
    check_vocab_size(sp.vocab_size(), where=f"tokenizer model {path}")
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer model {path} has vocab size {sp.vocab_size()}, "
                         f"but the config says tokenizer.vocab_size={vocab_size}")
    if sp.bos_id() < 0:
        raise ValueError(f"tokenizer model {path}: no BOS id; upstream shards start every "
                         "document with BOS")
    return sp


def check_vocab_size(vocab_size: int, *, where: str) -> None:
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"{where}: vocab size {vocab_size} does not fit uint16 shards "
                         f"(1..{MAX_VOCAB})")


@dataclass(frozen=True)
class ByteLUT:
    """Per token id: UTF-8 bytes of the piece without its leading space, the leading-space flag,
    and whether the token is a boundary (control, unknown, unused, or beyond the vocabulary)."""

    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray

    @classmethod
    def from_tokenizer(cls, sp: spm.SentencePieceProcessor, table_size: int | None = None):
        size = max(table_size or 0, sp.vocab_size())
        base = np.zeros(size, dtype=np.int64)
        lead = np.zeros(size, dtype=bool)
        boundary = np.ones(size, dtype=bool)
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                lead[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(base, lead, boundary)


def target_bytes(prev: np.ndarray, target: np.ndarray, lut: ByteLUT) -> np.ndarray:
    """Bytes charged to predicting `target` after `prev` (elementwise), as upstream's BPB charges:
    base_bytes[y] + (has_leading_space[y] and not is_boundary[x]). prev = -1 means a boundary."""
    prev_boundary = np.where(prev >= 0, lut.is_boundary[np.maximum(prev, 0)], True)
    return lut.base_bytes[target] + (lut.has_leading_space[target] & ~prev_boundary)


def count_bytes(tokens: np.ndarray, lut: ByteLUT, *, prev: int | None = None) -> np.ndarray:
    """Bytes charged to each token of a stream when predicted. `prev` is the token before
    tokens[0]; None treats it as a boundary (BOS)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    before = np.empty_like(tokens)
    if len(tokens):
        before[0] = prev if prev is not None else -1
        before[1:] = tokens[:-1]
    return target_bytes(before, tokens, lut)
