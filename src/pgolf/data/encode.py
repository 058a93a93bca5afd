"""Shards stage: tokenize docs.jsonl into upstream shards, or import an upstream shard folder."""

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pgolf.data.bytecount import ByteLUT, count_bytes, load_tokenizer
from pgolf.data.corpus import read_jsonl, val_split
from pgolf.data.shards import SPLITS, ShardWriter, SplitStats, read_shard, shard_name
from pgolf.io import read_json, sha256_file, write_json
from pgolf.provenance import Provenance

CHUNK = 1 << 24
UPSTREAM_SHARD = re.compile(r"(?:^|_)(val|train)_(\d{6})\.bin$")
UPSTREAM_VAL_BYTES = re.compile(r"(?:^|_)val_bytes_\d{6}\.bin$")


@dataclass(kw_only=True)
class ShardsConfig:
    val_docs: int | None = None
    shard_tokens: int = 100_000_000
    batch_docs: int = 1024


def doc_stream(encoded: list[list[int]], bos: int) -> np.ndarray:
    """Concatenate documents as BOS + tokens each (upstream writes no EOS)."""
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    is_bos = np.zeros(len(flat), dtype=bool)
    is_bos[starts] = True
    flat[starts] = bos
    flat[~is_bos] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64,
                                count=len(flat) - len(encoded))
    return flat


def encode_corpus(docs: Path, tokenizer: Path, out_dir: Path, *, cfg: ShardsConfig,
                  corpus: dict, threads: int = 1) -> dict:
    """Tokenize docs.jsonl into val shards (first val_docs documents) and train shards."""
    sp = load_tokenizer(tokenizer)
    lut = ByteLUT.from_tokenizer(sp)
    val_docs = val_split(cfg.val_docs, corpus)
    stats = {split: SplitStats() for split in SPLITS}
    writers = {split: ShardWriter(out_dir, split, cfg.shard_tokens, stats[split])
               for split in SPLITS}
    texts = read_jsonl(docs)
    index = 0
    with tqdm(total=corpus["count"], unit="doc", mininterval=2.0, desc="encode") as bar:
        while batch := list(itertools.islice(texts, cfg.batch_docs)):
            # Val documents come first, so a batch holds at most one val part and one train part.
            cut = min(len(batch), max(0, val_docs - index))
            for split, part in (("val", batch[:cut]), ("train", batch[cut:])):
                if part:
                    _encode_part(sp, part, writers[split], stats[split], lut, threads)
            index += len(batch)
            bar.update(len(batch))
    for writer in writers.values():
        writer.flush()
    return shards_summary(stats, sp=sp, val_docs=val_docs, shard_tokens=cfg.shard_tokens)


def _encode_part(sp, texts, writer, stats, lut, threads) -> None:
    tokens = doc_stream(sp.encode(texts, num_threads=threads), sp.bos_id())
    stats.docs += len(texts)
    stats.tokens += len(tokens)
    stats.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
    stats.bpb_bytes += int(count_bytes(tokens, lut).sum())
    writer.write(tokens.astype("<u2"))


def shards_summary(stats: dict[str, SplitStats], *, sp, val_docs: int,
                   shard_tokens: int | None) -> dict:
    return {"vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(), "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "splits": {split: s.summary() for split, s in stats.items()}}


def upstream_shards(folder: Path) -> dict[str, list[Path]]:
    """An upstream folder's shards per split, in index order (fineweb_val_000000.bin, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"shard folder {folder}: no such directory")
    found = {split: [] for split in SPLITS}
    for path in sorted(folder.iterdir()):
        if match := UPSTREAM_SHARD.search(path.name):
            found[match.group(1)].append(path)
    for split, paths in found.items():
        if not paths:
            raise ValueError(f"shard folder {folder}: no {split} shards (*_{split}_NNNNNN.bin)")
    return found


def import_shards(folder: Path, tokenizer: Path, out_dir: Path) -> dict:
    """Validate an upstream shard folder against the tokenizer and link it in under our names."""
    sp = load_tokenizer(tokenizer)
    lut = ByteLUT.from_tokenizer(sp)
    stats = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, paths in upstream_shards(folder).items():
        stats[split] = s = SplitStats(text_bytes=None)
        prev = None
        for index, path in enumerate(tqdm(paths, desc=f"import {split}", unit="shard")):
            tokens = read_shard(path)
            if len(tokens) and int(tokens.max()) >= sp.vocab_size():
                raise ValueError(f"shard {path}: token id {int(tokens.max())} is outside the "
                                 f"vocabulary of {tokenizer} (size {sp.vocab_size()})")
            s.docs += int(np.count_nonzero(tokens == sp.bos_id()))
            s.tokens += len(tokens)
            for start in range(0, len(tokens), CHUNK):  # bounded memory on 1e8-token shards
                chunk = tokens[start:start + CHUNK]
                s.bpb_bytes += int(count_bytes(chunk, lut, prev=prev).sum())
                prev = int(chunk[-1])
            name = shard_name(split, index)
            (out_dir / name).symlink_to(path.resolve())
            s.shards.append({"file": name, "source": str(path), "tokens": len(tokens),
                             "sha256": sha256_file(path)})
    summary = shards_summary(stats, sp=sp, val_docs=stats["val"].docs, shard_tokens=None)
    if val_bytes := link_val_bytes(folder, out_dir, stats["val"].shards):
        summary["val_bytes"] = val_bytes
    return summary


def link_val_bytes(folder: Path, out_dir: Path, val_shards: list[dict]) -> list[dict]:
    """Link CaseOps val byte sidecars (one per val shard, a shard-format file whose uint16s are
    each val token's byte count in the original text) in as fineweb_val_bytes_NNNNNN.bin, a name
    the val_*.bin glob does not take for a token shard; each must match its shard's length."""
    paths = sorted(p for p in Path(folder).iterdir() if UPSTREAM_VAL_BYTES.search(p.name))
    if not paths:
        return []
    if len(paths) != len(val_shards):
        raise ValueError(f"shard folder {folder}: {len(paths)} val byte sidecars "
                         f"(*_val_bytes_NNNNNN.bin) for {len(val_shards)} val shards")
    linked = []
    for index, (path, shard) in enumerate(zip(paths, val_shards, strict=True)):
        count = read_shard(path).shape[0]
        if count != shard["tokens"]:
            raise ValueError(f"val byte sidecar {path}: {count} entries, but its val shard "
                             f"{shard['source']} has {shard['tokens']} tokens")
        name = f"fineweb_val_bytes_{index:06d}.bin"
        (out_dir / name).symlink_to(path.resolve())
        linked.append({"file": name, "source": str(path), "tokens": count,
                       "sha256": sha256_file(path)})
    return linked


def build_shards(cfg: ShardsConfig, *, tokenizer: Path, docs: str | None, corpus: str | None,
                 upstream: str | None, out_dir: Path, meta: Path, threads: int = 1,
                 provenance: Provenance | None = None) -> dict:
    """The shards stage: encode docs.jsonl, or import an upstream folder; write shards.json."""
    if upstream is not None:
        summary = import_shards(Path(upstream), tokenizer, out_dir)
    else:
        summary = encode_corpus(Path(docs), tokenizer, out_dir, cfg=cfg,
                                corpus=read_json(corpus), threads=threads)
    summary["provenance"] = provenance.record() if provenance else None
    write_json(meta, summary)
    return summary
