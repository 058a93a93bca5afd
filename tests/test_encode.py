"""Shards stage: encoding documents into shards, and importing an upstream shard folder."""

import os

import numpy as np
import pytest
import sentencepiece as spm
from conftest import write_jsonl

from pgolf.data.encode import ShardsConfig, encode_corpus, import_shards
from pgolf.data.shards import list_shards, read_shard, write_shard


@pytest.fixture
def encoded(tmp_path, sotu_texts, tokenizer_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", sotu_texts[:12])
    out = tmp_path / "shards"
    summary = encode_corpus(docs, tokenizer_path, out, cfg=ShardsConfig(val_docs=2,
                            shard_tokens=20_000), corpus={"count": 12}, threads=2)
    return summary, out


def stream(folder, split):
    return np.concatenate([read_shard(p) for p in list_shards(folder, split)])


def test_documents_are_bos_plus_tokens_split_val_first(encoded, sotu_texts, tokenizer_path):
    summary, out = encoded
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    for split, texts in (("val", sotu_texts[:2]), ("train", sotu_texts[2:12])):
        expected = np.concatenate([[1, *sp.encode(t)] for t in texts])
        assert np.array_equal(stream(out, split), expected)
        s = summary["splits"][split]
        assert (s["docs"], s["tokens"]) == (len(texts), len(expected))
        assert s["text_bytes"] == sum(len(t.encode()) for t in texts)
        assert sum(x["tokens"] for x in s["shards"]) == len(expected)
    assert len(summary["splits"]["train"]["shards"]) > 1  # documents crossed shard boundaries
    assert all(x["tokens"] == 20_000 for x in summary["splits"]["train"]["shards"][:-1])


def test_import_upstream_folder_links_and_agrees(encoded, tmp_path, tokenizer_path):
    summary, out = encoded
    upstream = tmp_path / "fineweb10B_sp384"
    upstream.mkdir()
    for split in ("val", "train"):
        for i, path in enumerate(list_shards(out, split)):
            os.link(path, upstream / f"fineweb_{split}_{i:06d}.bin")
    (upstream / "fineweb_val_bytes_000000.bin").write_bytes(b"sidecar, not a token shard")
    imported = import_shards(upstream, tokenizer_path, tmp_path / "linked")
    for split in ("val", "train"):
        ours, theirs = summary["splits"][split], imported["splits"][split]
        for key in ("docs", "tokens", "bpb_bytes"):
            assert ours[key] == theirs[key], (split, key)
        assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]
    assert (tmp_path / "linked" / "train_000001.bin").is_symlink()


def test_import_rejects_ids_outside_the_tokenizer(tmp_path, tokenizer_path):
    folder = tmp_path / "up"
    write_shard(folder / "fineweb_val_000000.bin", np.array([1, 5, 6]))
    write_shard(folder / "fineweb_train_000000.bin", np.array([1, 5, 5000]))
    with pytest.raises(ValueError, match=r"fineweb_train_000000.bin: token id 5000 .*\(size 384\)"):
        import_shards(folder, tokenizer_path, tmp_path / "out")


def test_import_needs_both_splits(tmp_path, tokenizer_path):
    write_shard(tmp_path / "up" / "fineweb_val_000000.bin", np.array([1, 5]))
    with pytest.raises(ValueError, match="no train shards"):
        import_shards(tmp_path / "up", tokenizer_path, tmp_path / "out")
