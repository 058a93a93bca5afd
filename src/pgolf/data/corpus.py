"""Corpus stage: gather documents from a configured source into docs.jsonl + docs.json."""

import hashlib
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.data.hub import HubConfig, fetch_docs
from pgolf.io import atomic_path, read_json, require_file, sha256_file, write_json
from pgolf.provenance import Provenance

SOURCES = ("demo", "text", "jsonl", "hf", "shards", "hub_shards")
UPSTREAM_VAL_DOCS = 50_000


@dataclass(kw_only=True)
class CorpusConfig:
    source: str = "demo"
    path: str | None = None
    hf: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self):
        if isinstance(self.hf, dict):
            self.hf = HubConfig(**self.hf)
        if self.source not in SOURCES:
            raise ValueError(f"corpus.source: unknown source {self.source!r}; one of {SOURCES}")
        if self.source in ("text", "jsonl", "shards") and not self.path:
            raise ValueError(f"corpus.source={self.source!r} needs corpus.path")


def read_jsonl(path: str | Path) -> Iterator[str]:
    """Yield the "text" of each line of a docs_selected.jsonl-style file (.xz allowed)."""
    path = require_file(path, "corpus file")
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(_checked_lines(f, path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number}: expected an object with a string "text", '
                                 f"got {line[:80]!r}")
            yield text


def _checked_lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err})") from None
    except (lzma.LZMAError, EOFError) as err:
        raise ValueError(f"{path}: corrupt xz stream ({err})") from None


def read_text_folder(path: str | Path) -> Iterator[str]:
    """Yield each .txt file of a folder (sorted by name) as one document."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"corpus folder {folder}: no such directory")
    for file in sorted(folder.glob("*.txt")):
        try:
            yield file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 ({err})") from None


def check_demo(corpus: Path, sidecar: Path) -> dict:
    """The bundled corpus must be the bytes its sidecar describes; return the sidecar."""
    meta = read_json(sidecar)
    with lzma.open(corpus) as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != meta["docs_sha256"]:
        raise ValueError(f"{corpus}: sha256 {digest} does not match {sidecar} "
                         f"({meta['docs_sha256']})")
    return meta


def source_docs(cfg: CorpusConfig, *, demo: Path) -> tuple[Iterator[str], dict]:
    """The documents of the configured source, and what to record about where they came from."""
    if cfg.source == "demo":
        sidecar = check_demo(demo, demo.with_name("sotu.json"))
        return read_jsonl(demo), {"source": "demo", "path": str(demo), **sidecar}
    if cfg.source == "text":
        return read_text_folder(cfg.path), {"source": "text", "path": cfg.path}
    if cfg.source == "jsonl":
        digest = sha256_file(require_file(cfg.path, "corpus file"))
        return read_jsonl(cfg.path), {"source": "jsonl", "path": cfg.path,
                                      "source_sha256": digest}
    if cfg.source == "hf":
        docs, sidecar = fetch_docs(cfg.hf)
        return read_jsonl(docs), {"source": "hf", "path": str(docs), **sidecar}
    raise ValueError(f"corpus.source={cfg.source!r} has no documents (shards are imported as is)")


def build_corpus(cfg: CorpusConfig, *, demo: Path, out: Path, meta: Path,
                 provenance: Provenance | None = None) -> dict:
    """Write docs.jsonl (one {"text": ...} per line) and docs.json (count, sha256, source)."""
    docs, origin = source_docs(cfg, demo=Path(demo))
    count = text_bytes = 0
    digest = hashlib.sha256()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in docs:
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            count += 1
            text_bytes += len(text.encode("utf-8"))
        if count == 0:
            raise ValueError(f"corpus ({origin['source']}: {origin.get('path')}) has no documents")
        if origin.get("num_docs", count) != count:
            raise ValueError(f"corpus {origin.get('path')}: {count} documents, but its sidecar "
                             f"says num_docs={origin['num_docs']}")
    summary = {"count": count, "sha256": digest.hexdigest(), "text_bytes": text_bytes,
               "origin": origin,
               "provenance": provenance.record() if provenance else None}
    write_json(meta, summary)
    return summary


def val_split(val_docs: int | None, corpus: dict) -> int:
    """The number of validation documents (the first ones): the config value, else the hub
    sidecar's docs_val (as upstream), else upstream's 50,000. `corpus` is docs.json."""
    origin = corpus.get("origin", {})
    if val_docs is None:
        val_docs = origin.get("docs_val", UPSTREAM_VAL_DOCS)
    if not 1 <= val_docs < corpus["count"]:
        raise ValueError(f"shards.val_docs={val_docs} must leave at least one validation and one "
                         f"training document; the corpus {origin.get('path')} has "
                         f"{corpus['count']}")
    return val_docs
