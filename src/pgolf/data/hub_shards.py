"""The hub_shards corpus source: upstream's pre-tokenized shards from the hub, as upstream's
data/cached_challenge_fineweb.py fetches them (manifest, tokenizer, all val shards, the first N
train shards, CaseOps val byte sidecars), verified and cached for resumed runs."""

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pgolf.data.hub import HubConfig, download
from pgolf.io import read_json, sha256_file, write_json
from pgolf.provenance import Provenance

MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Wanted:
    """One file to fetch: its kind, its path under the remote root, and a manifest sha256."""

    kind: str  # manifest | tokenizer | val | val_bytes | train
    remote: str
    sha256: str | None = None


def _entry(entries, name: str, what: str, where: str) -> dict:
    found = [e for e in entries or [] if isinstance(e, dict) and e.get("name") == name]
    if not found:
        names = sorted(str(e.get("name")) for e in entries or [] if isinstance(e, dict))
        raise ValueError(f"{where}: no {what} {name!r}; it lists {names}")
    return found[0]


def _count(stats: dict, key: str, where: str) -> int:
    value = stats.get(key)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: stats.{key} = {value!r}: expected a file count")
    return value


def plan(manifest: dict, cfg: HubConfig, *, where: str) -> list[Wanted]:
    """The files upstream's downloader takes for `cfg.variant`: the tokenizer model, every val
    shard, the first `cfg.train_shards` train shards (fineweb_train_000000.bin on), and the val
    byte sidecars where the dataset entry names them (val_bytes_glob or stats.files_val_bytes).

    A manifest may carry "sha256": {path under the remote root: hex digest}; upstream's carry
    none, so the hub's own LFS sha256 is what most files are checked against (see `verify`).
    """
    dataset = _entry(manifest.get("datasets"), f"fineweb10B_{cfg.variant}", "dataset", where)
    stats = dataset.get("stats") or {}
    val, train = _count(stats, "files_val", where), _count(stats, "files_train", where)
    if val < 1:
        raise ValueError(f"{where}: dataset {dataset['name']} has no val shards")
    if cfg.train_shards > train:
        raise ValueError(f"corpus.hf.train_shards = {cfg.train_shards}: dataset "
                         f"{dataset['name']} in {where} has only {train} train shards")
    tokenizer = _entry(manifest.get("tokenizers"), dataset.get("tokenizer_name"), "tokenizer",
                       where)
    if not tokenizer.get("model_path"):
        raise ValueError(f"{where}: tokenizer {tokenizer['name']!r} has no model_path (pgolf "
                         "reads SentencePiece .model files)")
    folder = f"datasets/{dataset['name']}"
    names = [("tokenizer", tokenizer["model_path"])]
    names += [("val", f"{folder}/fineweb_val_{i:06d}.bin") for i in range(val)]
    if dataset.get("val_bytes_glob") or stats.get("files_val_bytes"):
        count = stats.get("files_val_bytes") or val
        names += [("val_bytes", f"{folder}/fineweb_val_bytes_{i:06d}.bin") for i in range(count)]
    elif tokenizer.get("text_transform") not in (None, "", "identity"):
        # CaseOps: the tokens spell transformed text; only the sidecars give the original bytes
        raise ValueError(f"{where}: tokenizer {tokenizer['name']!r} applies text_transform "
                         f"{tokenizer['text_transform']!r}, but dataset {dataset['name']} names "
                         "no val byte sidecars (val_bytes_glob or stats.files_val_bytes) to "
                         "count the original bytes with")
    names += [("train", f"{folder}/fineweb_train_{i:06d}.bin") for i in range(cfg.train_shards)]
    digests = manifest.get("sha256") or {}
    return [Wanted(kind=kind, remote=str(name), sha256=digests.get(str(name)))
            for kind, name in names]


def check_vocab(manifest: dict, cfg: HubConfig, vocab_size: int | None, *, where: str) -> None:
    """Fail before fetching gigabytes when the dataset's vocabulary is not the configured one."""
    dataset = _entry(manifest.get("datasets"), f"fineweb10B_{cfg.variant}", "dataset", where)
    theirs = dataset.get("vocab_size")
    if vocab_size is not None and theirs is not None and theirs != vocab_size:
        raise ValueError(f"tokenizer.vocab_size = {vocab_size}, but dataset {dataset['name']} "
                         f"in {where} has vocab_size {theirs}")


def verify(path: Path, wanted: Wanted, cfg: HubConfig) -> str:
    """sha256 of a cached file, checked against the manifest's digest and against the hub's:
    huggingface_hub names an LFS file's cached blob by its sha256 (the ETag) but never checks it.
    A mismatch removes the cached copy, so a rerun fetches that file again (and only it)."""
    blob = path.resolve()
    digest = sha256_file(blob)
    hub = blob.name if SHA256.fullmatch(blob.name) else None
    for source, expected in (("the manifest", wanted.sha256), ("the hub (LFS sha256)", hub)):
        if expected and digest != expected:
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise ValueError(f"hub dataset {cfg.repo_id}, file {cfg.remote_root}/{wanted.remote}: "
                             f"sha256 {digest} does not match {expected} from {source}; removed "
                             f"the cached copy {blob}, a rerun fetches it again")
    return digest


def _fetch(cfg: HubConfig, wanted: Wanted) -> dict:
    try:
        path = download(cfg, wanted.remote)
        return {"kind": wanted.kind, "remote": wanted.remote, "cache": str(path.resolve()),
                "sha256": verify(path, wanted, cfg), "commit": _commit(path)}
    except ValueError as err:
        return {"kind": wanted.kind, "remote": wanted.remote, "error": str(err)}


def _commit(path: Path) -> str | None:
    parts = path.parts  # <cache>/datasets--owner--name/snapshots/<commit>/<file in the repo>
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def fetch_all(cfg: HubConfig, wanted: list[Wanted], *, threads: int = 1) -> list[dict]:
    """Fetch every file (files already in the cache are not downloaded again), then fail once,
    naming every file that could not be had: the others stay cached for the rerun."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        fetched = list(pool.map(lambda w: _fetch(cfg, w), wanted))
    failed = [f["error"] for f in fetched if "error" in f]
    if failed:
        raise ValueError(f"{len(failed)} of {len(wanted)} files could not be fetched "
                         "(the rest are cached):\n" + "\n".join(failed))
    return fetched


def fetch_shards(cfg: HubConfig, *, out_dir: Path, tokenizer: Path, meta: Path,
                 vocab_size: int | None = None, threads: int = 1,
                 provenance: Provenance | None = None) -> dict:
    """The hub_shards stage: fetch the variant's files into the hub cache, link the shards (and
    byte sidecars) into `out_dir` under upstream's names, copy the tokenizer model to
    `tokenizer`, and record what came from where in `meta`."""
    where = f"hub dataset {cfg.repo_id}, {cfg.remote_root}/{MANIFEST}"
    manifest_path = download(cfg, MANIFEST)
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object")
    check_vocab(manifest, cfg, vocab_size, where=where)
    fetched = fetch_all(cfg, plan(manifest, cfg, where=where), threads=threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in fetched:
        if item["kind"] == "tokenizer":
            shutil.copyfile(item["cache"], tokenizer)
        else:
            (out_dir / Path(item["remote"]).name).symlink_to(item["cache"])
    record = {"repo_id": cfg.repo_id, "revision": cfg.revision, "remote_root": cfg.remote_root,
              "variant": cfg.variant, "train_shards": cfg.train_shards,
              "commit": _commit(manifest_path), "manifest": {
                  "cache": str(manifest_path.resolve()),
                  "sha256": sha256_file(manifest_path)},
              "files": fetched,
              "provenance": provenance.record() if provenance else None}
    write_json(meta, record)
    return record
