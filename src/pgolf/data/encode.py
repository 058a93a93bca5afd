"""Shards stage: tokenize docs.jsonl into upstream shards, or import an upstream shard folder."""

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pgolf.data import caseops
from pgolf.data.bytecount import ByteLUT, count_bytes, load_tokenizer
from pgolf.data.corpus import read_jsonl, val_split
from pgolf.data.shards import (
    SPLITS,
    ShardWriter,
    SplitStats,
    check_sidecars,
    read_shard,
    shard_name,
    sidecar_name,
)
from pgolf.io import read_json, sha256_file, write_json
from pgolf.provenance import Provenance

CHUNK = 1 << 24
UPSTREAM_SHARD = re.compile(r"(?:^|_)(val|train)_(\d{6})\.bin$")
UPSTREAM_SIDECAR = re.compile(r"(?:^|_)val_bytes_(\d{6})\.bin$")


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


def open_tokenizer(tokenizer: Path, caseops_on: bool):
    """The shards' tokenizer, checked to reserve the CaseOps controls exactly when caseops_on."""
    sp = load_tokenizer(tokenizer)
    caseops.check_tokenizer(sp, caseops=caseops_on, where=f"tokenizer model {tokenizer}")
    return sp


def encode_corpus(docs: Path, tokenizer: Path, out_dir: Path, *, cfg: ShardsConfig,
                  corpus: dict, threads: int = 1, caseops_on: bool = False) -> dict:
    """Tokenize docs.jsonl into val shards (first val_docs documents) and train shards. With
    CaseOps the documents are transformed first, and each val shard gets its byte sidecar."""
    sp = open_tokenizer(tokenizer, caseops_on)
    lut = ByteLUT.from_tokenizer(sp)
    val_docs = val_split(cfg.val_docs, corpus)
    stats = {split: SplitStats(bpb_bytes=None if caseops_on and split == "train" else 0)
             for split in SPLITS}
    writers = {split: ShardWriter(out_dir, split, cfg.shard_tokens, stats[split])
               for split in SPLITS}
    sidecar = None
    if caseops_on:
        stats["val"].sidecars = []
        sidecar = ShardWriter(out_dir, "val", cfg.shard_tokens, stats["val"],
                              records=stats["val"].sidecars, name=sidecar_name)
    texts = read_jsonl(docs)
    index = 0
    with tqdm(total=corpus["count"], unit="doc", mininterval=2.0, desc="encode") as bar:
        while batch := list(itertools.islice(texts, cfg.batch_docs)):
            # Val documents come first, so a batch holds at most one val part and one train part.
            cut = min(len(batch), max(0, val_docs - index))
            for split, part in (("val", batch[:cut]), ("train", batch[cut:])):
                if part:
                    tokens, counts = (encode_caseops(sp, part, threads, val=split == "val")
                                      if caseops_on else encode_plain(sp, part, lut, threads))
                    _write_part(part, tokens, counts, writers[split], stats[split],
                                sidecar if split == "val" else None)
            index += len(batch)
            bar.update(len(batch))
    for writer in (*writers.values(), *([sidecar] if sidecar else [])):
        writer.flush()
    summary = shards_summary(stats, sp=sp, val_docs=val_docs, shard_tokens=cfg.shard_tokens)
    return {**summary, "caseops": True} if caseops_on else summary


def encode_plain(sp, texts, lut, threads) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token stream, and what BPB charges each token (the LUT rule)."""
    tokens = doc_stream(sp.encode(texts, num_threads=threads), sp.bos_id())
    return tokens, count_bytes(tokens, lut)


def encode_caseops(sp, texts, threads, *, val: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The token stream of the documents' CaseOps transform and, for val, each token's bytes of
    original text (BOS 0): the sidecar. Train text needs no sidecar (upstream writes none)."""
    transformed = [caseops.encode(t) for t in texts]
    if not val:
        return doc_stream(sp.encode(transformed, num_threads=threads), sp.bos_id()), None
    mapped = sp.encode(transformed, out_type="offset_mapping", num_threads=threads)
    tokens = doc_stream([m["ids"] for m in mapped], sp.bos_id())
    counts = doc_stream([caseops.original_bytes(t, m["offsets"])
                         for t, m in zip(transformed, mapped, strict=True)], 0)
    return tokens, counts


def _write_part(texts, tokens, counts, writer, stats, sidecar) -> None:
    stats.docs += len(texts)
    stats.tokens += len(tokens)
    stats.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
    if counts is not None:
        stats.bpb_bytes += int(counts.sum())
    writer.write(tokens.astype("<u2"))
    if sidecar is not None:
        assert counts.max(initial=0) <= 0xFFFF, "a token's bytes must fit the uint16 sidecar"
        sidecar.write(counts.astype("<u2"))


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


def import_shards(folder: Path, tokenizer: Path, out_dir: Path, *,
                  caseops_on: bool = False) -> dict:
    """Validate an upstream shard folder against the tokenizer and link it in under our names;
    with CaseOps, its val byte sidecar too (what BPB divides by)."""
    sp = open_tokenizer(tokenizer, caseops_on)
    lut = ByteLUT.from_tokenizer(sp)
    stats = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, paths in upstream_shards(folder).items():
        stats[split] = s = SplitStats(text_bytes=None, bpb_bytes=None if caseops_on else 0)
        prev = None
        for index, path in enumerate(tqdm(paths, desc=f"import {split}", unit="shard")):
            tokens = read_shard(path)
            if len(tokens) and int(tokens.max()) >= sp.vocab_size():
                raise ValueError(f"shard {path}: token id {int(tokens.max())} is outside the "
                                 f"vocabulary of {tokenizer} (size {sp.vocab_size()})")
            s.docs += int(np.count_nonzero(tokens == sp.bos_id()))
            s.tokens += len(tokens)
            if not caseops_on and len(tokens):  # CaseOps: the sidecar holds the val bytes
                s.bpb_bytes += lut_bytes(tokens, lut, prev=prev)
                prev = int(tokens[-1])
            s.shards.append(_link(path, out_dir / shard_name(split, index), tokens=len(tokens)))
    if caseops_on:
        import_sidecars(folder, stats["val"], out_dir, bos=sp.bos_id())
    summary = shards_summary(stats, sp=sp, val_docs=stats["val"].docs, shard_tokens=None)
    return {**summary, "caseops": True} if caseops_on else summary


def lut_bytes(tokens: np.ndarray, lut: ByteLUT, *, prev: int | None) -> int:
    """The LUT bytes of a shard's tokens, in chunks: bounded memory on 1e8-token shards."""
    total = 0
    for start in range(0, len(tokens), CHUNK):
        chunk = tokens[start:start + CHUNK]
        total += int(count_bytes(chunk, lut, prev=prev).sum())
        prev = int(chunk[-1])
    return total


def _link(source: Path, target: Path, *, tokens: int) -> dict:
    target.symlink_to(source.resolve())
    return {"file": target.name, "source": str(source), "tokens": tokens,
            "sha256": sha256_file(source)}


def upstream_sidecars(folder: Path) -> list[Path]:
    """An upstream CaseOps folder's val byte sidecars (fineweb_val_bytes_000000.bin, ...)."""
    found = sorted(p for p in Path(folder).iterdir() if UPSTREAM_SIDECAR.search(p.name))
    if not found:
        raise ValueError(f"shard folder {folder}: no validation byte sidecar "
                         "(fineweb_val_bytes_NNNNNN.bin), but tokenizer.caseops = true needs one: "
                         "BPB divides by the bytes of the original text it records")
    return found


def import_sidecars(folder: Path, val: SplitStats, out_dir: Path, *, bos: int) -> None:
    """Check and link the sidecars of the val shards just linked; their sum is val's bpb_bytes."""
    shards = [Path(s["source"]) for s in val.shards]
    sidecars = upstream_sidecars(folder)
    check_sidecars(shards, sidecars, folder)
    val.sidecars, val.bpb_bytes = [], 0
    for index, (shard, path) in enumerate(zip(shards, sidecars, strict=True)):
        counts = read_shard(path)
        if np.any(counts[read_shard(shard) == bos]):
            raise ValueError(f"byte sidecar {path}: nonzero bytes at BOS positions of {shard}")
        val.bpb_bytes += int(counts.sum(dtype=np.int64))
        val.sidecars.append(_link(path, out_dir / sidecar_name(index), tokens=len(counts)))


def build_shards(cfg: ShardsConfig, *, tokenizer: Path, docs: str | None, corpus: str | None,
                 upstream: str | None, out_dir: Path, meta: Path, threads: int = 1,
                 caseops_on: bool = False, provenance: Provenance | None = None) -> dict:
    """The shards stage: encode docs.jsonl, or import an upstream folder; write shards.json.
    caseops_on is tokenizer.caseops."""
    if upstream is not None:
        summary = import_shards(Path(upstream), tokenizer, out_dir, caseops_on=caseops_on)
    else:
        summary = encode_corpus(Path(docs), tokenizer, out_dir, cfg=cfg,
                                corpus=read_json(corpus), threads=threads,
                                caseops_on=caseops_on)
    summary["provenance"] = provenance.record() if provenance else None
    write_json(meta, summary)
    return summary
