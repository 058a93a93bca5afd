"""The hub_shards source against the local stand-in of the hub (tests/test_hub.py): upstream's
manifest layout, the first N train shards, sha256 checks, resumed fetches, and the shards stage
importing what was fetched."""

import json

import numpy as np
import pytest
import test_hub

from pgolf.audit import declared_outputs
from pgolf.data.encode import ShardsConfig, build_shards
from pgolf.data.hub import HubConfig
from pgolf.data.hub_shards import fetch_shards
from pgolf.data.shards import shard_bytes
from pgolf.data.tokenizer import TokenizerConfig, build_tokenizer

hub = test_hub.hub  # the stand-in's fixture
REPO, COMMIT = test_hub.REPO, test_hub.COMMIT
DATASET = "datasets/datasets/fineweb10B_sp384"
TOKENIZER = "datasets/tokenizers/fineweb_384_bpe.model"


def tokens(seed: int, n: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(4, 384, size=n)
    ids[::7] = 1  # BOS starts documents
    return ids


def publish(hub, tokenizer_path, *, val=2, train=3, byte_sidecars=True, **manifest) -> dict:
    """Serve an upstream-layout export: manifest, tokenizer, val (+ byte sidecars), train."""
    files = {TOKENIZER: tokenizer_path.read_bytes()}
    for i in range(val):
        files[f"{DATASET}/fineweb_val_{i:06d}.bin"] = shard_bytes(tokens(i, 50 + i))
        if byte_sidecars:
            files[f"{DATASET}/fineweb_val_bytes_{i:06d}.bin"] = shard_bytes(
                np.full(50 + i, 3) * (tokens(i, 50 + i) != 1))
    for i in range(train):
        files[f"{DATASET}/fineweb_train_{i:06d}.bin"] = shard_bytes(tokens(100 + i, 80))
    entry = {"name": "fineweb10B_sp384", "tokenizer_name": "sp_bpe_384", "vocab_size": 384,
             "stats": {"files_val": val, "files_train": train}}
    if byte_sidecars:
        entry["val_bytes_glob"] = "datasets/fineweb10B_sp384/fineweb_val_bytes_*.bin"
    body = {"version": "10B", "datasets": [entry],
            "tokenizers": [{"name": "sp_bpe_384", "model_path": TOKENIZER.removeprefix(
                "datasets/"), "vocab_path": "tokenizers/fineweb_384_bpe.vocab"}], **manifest}
    files["datasets/manifest.json"] = json.dumps(body).encode()
    hub.files.update(files)
    return files


def config(hub, tmp_path, **kw) -> HubConfig:
    return HubConfig(repo_id=REPO, endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"),
                     **{"variant": "sp384", **kw})


def fetch(hub, tmp_path, cfg=None, vocab_size=384, **kw) -> dict:
    out = tmp_path / "run"
    for name in ("hub_shards", "hub_tokenizer.model", "hub_shards.json"):  # Snakemake clears
        path = out / name
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        path.unlink(missing_ok=True)
    out.mkdir(exist_ok=True)
    return fetch_shards(cfg or config(hub, tmp_path, **kw), out_dir=out / "hub_shards",
                        tokenizer=out / "hub_tokenizer.model", meta=out / "hub_shards.json",
                        vocab_size=vocab_size, threads=2)


def gets(hub) -> set[str]:
    base = f"/datasets/{REPO}/resolve/main/"
    return {path.removeprefix(base) for method, path in hub.requests if method == "GET"}


def test_fetches_the_first_train_shards_and_the_shards_stage_imports_them(
        hub, tmp_path, tokenizer_path):
    files = publish(hub, tokenizer_path)
    record = fetch(hub, tmp_path, train_shards=2)

    folder = tmp_path / "run" / "hub_shards"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                     "fineweb_val_000000.bin", "fineweb_val_000001.bin",
                     "fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    for name in names:
        remote = f"{DATASET}/{name}"
        assert (folder / name).read_bytes() == files[remote]
    # a prefix of upstream's order: shard 2 of 3 is neither fetched nor asked for
    assert f"{DATASET}/fineweb_train_000002.bin" not in gets(hub)
    assert not any("train_000002" in path for _, path in hub.requests)
    assert (tmp_path / "run" / "hub_tokenizer.model").read_bytes() == files[TOKENIZER]
    assert record["commit"] == COMMIT
    assert {f["kind"] for f in record["files"]} == {"tokenizer", "val", "val_bytes", "train"}
    # The cache lives outside the run's outputs, and the links point into it.
    assert str((folder / names[0]).resolve()).startswith(str(tmp_path / "cache"))

    summary = build_shards(ShardsConfig(), tokenizer=tokenizer_path, docs=None, corpus=None,
                           upstream=str(folder), out_dir=tmp_path / "shards",
                           meta=tmp_path / "shards.json")
    assert [s["tokens"] for s in summary["splits"]["val"]["shards"]] == [50, 51]
    assert summary["splits"]["train"]["tokens"] == 160
    # Without tokenizer.caseops the sidecars stay behind: BPB counts by the byte tables (the
    # sidecar import and its checks are tests/test_caseops.py's)
    assert "sidecars" not in summary["splits"]["val"]
    assert not list((tmp_path / "shards").glob("fineweb_val_bytes_*"))
    assert len(declared_outputs(tmp_path / "shards.json")) == 4


def test_missing_file_is_named_and_a_rerun_fetches_only_it(hub, tmp_path, tokenizer_path):
    files = publish(hub, tokenizer_path)
    missing = f"{DATASET}/fineweb_train_000001.bin"
    del hub.files[missing]
    with pytest.raises(ValueError) as err:
        fetch(hub, tmp_path, train_shards=3)
    message = str(err.value)
    assert "1 of 8 files could not be fetched" in message
    assert f"no file {missing}" in message and REPO in message
    first = gets(hub)
    assert f"{DATASET}/fineweb_train_000002.bin" in first  # the others were fetched regardless

    hub.files[missing] = files[missing]
    hub.requests.clear()
    record = fetch(hub, tmp_path, train_shards=3)
    assert gets(hub) == {missing}
    assert len(record["files"]) == 8


def test_corrupted_cached_file_is_caught_removed_and_refetched(hub, tmp_path, tokenizer_path):
    files = publish(hub, tokenizer_path, byte_sidecars=False)
    fetch(hub, tmp_path, train_shards=1)
    remote = f"{DATASET}/fineweb_val_000001.bin"
    blob = (tmp_path / "run" / "hub_shards" / "fineweb_val_000001.bin").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the cache: same size, so huggingface_hub trusts it
    blob.write_bytes(bytes(data))

    hub.requests.clear()
    with pytest.raises(ValueError) as err:
        fetch(hub, tmp_path, train_shards=1)
    message = str(err.value)
    assert remote in message and "from the hub (LFS sha256)" in message
    assert blob.name in message and not blob.exists()
    assert gets(hub) == set()  # nothing was downloaded: every other file was cached

    fetch(hub, tmp_path, train_shards=1)
    assert gets(hub) == {remote}
    assert blob.read_bytes() == files[remote]


def test_manifest_sha256_is_checked(hub, tmp_path, tokenizer_path):
    remote = "datasets/fineweb10B_sp384/fineweb_train_000000.bin"
    publish(hub, tokenizer_path, sha256={remote: "0" * 64})
    with pytest.raises(ValueError, match=rf"{remote}: sha256 [0-9a-f]{{64}} does not match "
                                         rf"{'0' * 64} from the manifest"):
        fetch(hub, tmp_path, train_shards=1)


@pytest.mark.parametrize("kw, vocab, words", [
    ({"train_shards": 4}, 384, r"corpus\.hf\.train_shards = 4: .* has only 3 train shards"),
    ({"variant": "sp999"}, 384, r"no dataset 'fineweb10B_sp999'; it lists \['fineweb10B_sp384'\]"),
    ({}, 8192, r"tokenizer\.vocab_size = 8192, but dataset fineweb10B_sp384 .* vocab_size 384"),
])
def test_bad_settings_fail_before_any_shard_is_fetched(hub, tmp_path, tokenizer_path, kw, vocab,
                                                       words):
    publish(hub, tokenizer_path)
    cfg = config(hub, tmp_path, **{"train_shards": 1, **kw})
    with pytest.raises(ValueError, match=words):
        fetch(hub, tmp_path, cfg=cfg, vocab_size=vocab)
    assert gets(hub) == {"datasets/manifest.json"}


def test_transformed_text_needs_byte_sidecars(hub, tmp_path, tokenizer_path):
    publish(hub, tokenizer_path, byte_sidecars=False)
    manifest = json.loads(hub.files["datasets/manifest.json"])
    manifest["tokenizers"][0]["text_transform"] = "lossless_caps_caseops_v1"
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(ValueError, match=r"applies text_transform 'lossless_caps_caseops_v1', "
                                         r"but dataset fineweb10B_sp384 names no val byte"):
        fetch(hub, tmp_path, train_shards=1)
    assert gets(hub) == {"datasets/manifest.json"}


def test_tokenizer_stage_takes_the_fetched_model(tmp_path, tokenizer_path):
    out, meta = tmp_path / "tokenizer.model", tmp_path / "tokenizer.json"
    build_tokenizer(TokenizerConfig(vocab_size=384), docs=None, corpus=None, val_docs=None,
                    out=out, meta=meta, model=str(tokenizer_path))
    assert out.read_bytes() == tokenizer_path.read_bytes()
    assert json.loads(meta.read_text())["trained_on"] is None
    with pytest.raises(ValueError, match=r"vocab size 384, but the config says "
                                         r"tokenizer\.vocab_size=8192"):
        build_tokenizer(TokenizerConfig(vocab_size=8192), docs=None, corpus=None,
                        val_docs=None, out=out, meta=meta, model=str(tokenizer_path))


def test_train_shards_and_variant_are_checked():
    with pytest.raises(ValueError, match=r"corpus\.hf\.train_shards = 0: must be >= 1"):
        HubConfig(train_shards=0)
    with pytest.raises(ValueError, match=r"corpus\.hf\.variant = 'a/b'"):
        HubConfig(variant="a/b")
