"""The upstream token-shard format: read, write, validate, and the shards.json summary.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by that many little-endian uint16 token ids. Documents are BOS + tokens (no EOS) and run
across shard boundaries; splits never share a shard. With CaseOps, each val shard has a byte
sidecar of the same format (fineweb_val_bytes_NNNNNN.bin): per token, its bytes of original text.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgolf.io import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 65535  # ids must fit uint16; the bound for a shard vocabulary
SPLITS = ("val", "train")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def sidecar_name(index: int) -> str:
    """The CaseOps byte sidecar of val shard `index`, under upstream's name."""
    return f"fineweb_val_bytes_{index:06d}.bin"


def shard_bytes(tokens: np.ndarray) -> bytes:
    """The exact bytes of a shard holding `tokens`."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    return header.tobytes() + np.asarray(tokens).astype("<u2", copy=False).tobytes()


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write one shard atomically; return the sha256 of its bytes."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must fit uint16, got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    if len(tokens) > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header count")
    data = shard_bytes(tokens)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {path}: no such file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"shard {path}: wrong magic {header[0]} (expected {MAGIC})")
    if header[1] != VERSION:
        raise ValueError(f"shard {path}: unsupported version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ValueError(f"shard {path}: size {size} bytes does not match header token count "
                         f"{count} (expected {expected}); truncated or corrupt")
    return count


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a validated shard's tokens (read-only uint16)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


@dataclass
class SplitStats:
    """Per split counts for shards.json. bpb_bytes is what BPB divides by (the LUT rule of
    bytecount.count_bytes, or with CaseOps the sum of the val sidecar); text_bytes is the
    documents' raw UTF-8 size (NFKC normalisation can make the two differ)."""

    docs: int = 0
    tokens: int = 0
    bpb_bytes: int | None = 0  # None: unknown (CaseOps train text, which has no sidecar)
    text_bytes: int | None = 0
    shards: list[dict] = field(default_factory=list)
    sidecars: list[dict] | None = None  # CaseOps val: the byte sidecar files

    def summary(self) -> dict:
        known = self.tokens and self.bpb_bytes is not None
        per_token = self.bpb_bytes / self.tokens if known else None
        extra = {} if self.sidecars is None else {"sidecars": self.sidecars}
        return {"docs": self.docs, "tokens": self.tokens, "bpb_bytes": self.bpb_bytes,
                "text_bytes": self.text_bytes, "bytes_per_token": per_token,
                "shards": self.shards, **extra}


class ShardWriter:
    """Cuts one split's token stream into fixed-size shards; documents may span two shards.
    `records` (default stats.shards) lists the shards written, `name` names shard i."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, stats: SplitStats, *,
                 records: list | None = None, name=None):
        self.directory, self.split, self.stats = Path(directory), split, stats
        self.records = stats.shards if records is None else records
        self.name = name or (lambda index: shard_name(split, index))
        self.buffer = np.empty(shard_tokens, dtype="<u2")
        self.filled = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        name = self.name(len(self.records))
        digest = write_shard(self.directory / name, self.buffer[:self.filled])
        self.records.append({"file": name, "tokens": self.filled, "sha256": digest})
        self.filled = 0


def token_counts(shards: list[Path], vocab_size: int, *, limit: int | None = None) -> np.ndarray:
    """How often each token id occurs in the shards (stopping after the shard that passes
    `limit` tokens, if given)."""
    counts, seen = np.zeros(vocab_size, dtype=np.int64), 0
    for path in shards:
        tokens = read_shard(path)
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        seen += len(tokens)
        if limit is not None and seen >= limit:
            break
    return counts


def summary_path(directory: str | Path) -> Path:
    """The shards stage writes <dir>.json beside <dir>/ (shards.json beside shards/)."""
    return Path(directory).with_suffix(".json")


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """A split's shards: pgolf's names (val_000000.bin), else upstream's (fineweb_val_000000.bin),
    so an exported train_gpt.py reads either folder."""
    ours = sorted(Path(directory).glob(f"{split}_*.bin"))
    return ours or sorted(Path(directory).glob(f"fineweb_{split}_" + "[0-9]" * 6 + ".bin"))



def list_sidecars(directory: str | Path) -> list[Path]:
    """The CaseOps byte sidecars of a shard folder, in index order ([] without CaseOps)."""
    return sorted(Path(directory).glob("fineweb_val_bytes_" + "[0-9]" * 6 + ".bin"))


def check_sidecars(shards: list[Path], sidecars: list[Path], folder: Path) -> None:
    """Sidecar i must hold one entry per token of val shard i."""
    if len(sidecars) != len(shards):
        raise ValueError(f"shard folder {folder}: {len(sidecars)} byte sidecar files "
                         f"(fineweb_val_bytes_NNNNNN.bin) for {len(shards)} val shards")
    for shard, sidecar in zip(shards, sidecars, strict=True):
        tokens, entries = read_header(shard), read_header(sidecar)
        if tokens != entries:
            raise ValueError(f"byte sidecar {sidecar} holds {entries} entries, but its val shard "
                             f"{shard} holds {tokens} tokens")
