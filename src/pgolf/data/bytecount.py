"""Byte accounting for BPB: the UTF-8 bytes each predicted token stands for, as upstream counts
them, and loading the tokenizer they come from. Evaluation needs only this, not the trainer.

Two counters answer the same call, `target_bytes(prev, target, positions)`: the bytes charged to
predicting `target` (the token at val-stream index `positions`) after `prev`. ByteLUT applies
upstream's rule to the token pair; SidecarBytes (CaseOps) reads the original-text bytes the shards
stage recorded per position. `byte_counter` picks the one a shard folder needs.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import (
    MAX_VOCAB,
    check_sidecars,
    list_shards,
    list_sidecars,
    read_shard,
    summary_path,
)
from pgolf.io import read_json, require_file


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

    def target_bytes(self, prev: np.ndarray, target: np.ndarray,
                     positions: np.ndarray | None = None) -> np.ndarray:
        """Upstream's rule on the token pairs (`positions` is not needed)."""
        return target_bytes(prev, target, self)


@dataclass(frozen=True)
class SidecarBytes:
    """CaseOps: per index of the val stream, the bytes of original text its token stands for
    (BOS 0), from the shard folder's byte sidecar. BPB divides by these, not by the bytes of the
    transformed text the tokens spell."""

    values: np.ndarray

    @classmethod
    def from_folder(cls, folder: str | Path):
        shards, sidecars = list_shards(folder, "val"), list_sidecars(folder)
        check_sidecars(shards, sidecars, Path(folder))
        return cls(np.concatenate([read_shard(p) for p in sidecars]))

    def target_bytes(self, prev: np.ndarray, target: np.ndarray,
                     positions: np.ndarray) -> np.ndarray:
        """The recorded bytes at the targets' stream indices (the tokens themselves are not
        needed)."""
        return self.values[positions].astype(np.int64)


class ByteCounter(Protocol):
    def target_bytes(self, prev: np.ndarray, target: np.ndarray,
                     positions: np.ndarray) -> np.ndarray: ...


def byte_counter(shard_dir: str | Path, tokenizer: str | Path,
                 vocab_size: int | None = None) -> ByteCounter:
    """What BPB divides by on this shard folder's val stream: its CaseOps byte sidecar where the
    shards stage wrote one (tokenizer.caseops), else the tokenizer's LUT (table of vocab_size).
    A folder whose shards.json records CaseOps but that holds no sidecar is an error."""
    if list_sidecars(shard_dir):
        return SidecarBytes.from_folder(shard_dir)
    summary = summary_path(shard_dir)
    if summary.is_file() and read_json(summary).get("caseops"):
        raise ValueError(f"shard folder {shard_dir}: no byte sidecar (fineweb_val_bytes_NNNNNN.bin)"
                         f", but {summary} records tokenizer.caseops = true")
    return ByteLUT.from_tokenizer(load_tokenizer(tokenizer), vocab_size)


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
