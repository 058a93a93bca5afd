"""Window scores (checked against direct per-window computation) and curriculum buckets."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from pgolf.data.manifest import ManifestConfig, assign_buckets, build_manifest
from pgolf.data.scores import ScoresConfig, read_metadata, score_windows
from pgolf.data.shards import write_shard

SEQ = 16


@pytest.fixture
def shards(tmp_path, sotu_texts, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    folder = tmp_path / "shards"
    streams = [np.array([1, *sp.encode(t)[:n]]) for t, n in ((sotu_texts[0], 700),
                                                              (sotu_texts[1], 333))]
    for i, tokens in enumerate(streams):
        write_shard(folder / f"train_{i:06d}.bin", tokens)
    write_shard(folder / "val_000000.bin", np.array([1, 2, 3]))  # never scored
    return folder, streams


def direct_unigram(streams, vocab):
    counts = np.bincount(np.concatenate(streams), minlength=vocab)
    p = counts / counts.sum()
    out = []
    for tokens in streams:
        for k in range((len(tokens) - 1) // SEQ):
            window = tokens[k * SEQ:(k + 1) * SEQ + 1]
            out.append(np.mean([-np.log2(p[t]) for t in window]))
    return np.array(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_unigram_scores_equal_direct_computation(tmp_path, shards, tokenizer_path, threads):
    folder, streams = shards
    table = score_windows(folder, tokenizer_path, tmp_path / "s.parquet", seq_len=SEQ,
                          cfg=ScoresConfig(scorer="unigram"), vocab_size=384, threads=threads)
    assert table.num_rows == 699 // SEQ + 332 // SEQ
    np.testing.assert_allclose(table["score"].to_numpy(), direct_unigram(streams, 384), rtol=1e-12)
    starts = table["start"].to_numpy()
    assert starts[0] == 0 and starts[1] == SEQ  # targets of consecutive windows do not overlap
    assert set(table["shard"].to_pylist()) == {"train_000000.bin", "train_000001.bin"}
    assert read_metadata(tmp_path / "s.parquet")["seq_len"] == SEQ


def test_zstd_scores_equal_direct_computation(tmp_path, shards, tokenizer_path):
    folder, streams = shards
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    table = score_windows(folder, tokenizer_path, tmp_path / "s.parquet", seq_len=SEQ,
                          cfg=ScoresConfig(scorer="zstd", zstd_level=5), vocab_size=384,
                          threads=2)
    shard0 = table.filter(pq.read_table(tmp_path / "s.parquet")["shard"].to_numpy(
        zero_copy_only=False) == "train_000000.bin")
    for start, score in zip(shard0["start"].to_pylist()[:5], shard0["score"].to_pylist()[:5],
                            strict=True):
        raw = sp.decode(streams[0][start:start + SEQ + 1].tolist()).encode()
        assert score == len(zstandard.ZstdCompressor(level=5).compress(raw)) / len(raw)


def test_shards_shorter_than_a_window(tmp_path, tokenizer_path):
    write_shard(tmp_path / "train_000000.bin", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="shorter than one window"):
        score_windows(tmp_path, tokenizer_path, tmp_path / "s.parquet", seq_len=SEQ,
                      cfg=ScoresConfig(), vocab_size=384)


def test_buckets_have_equal_counts_even_with_ties():
    score = np.array([3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 5.0, 4.0, 1.0, 0.5, 6.0])
    bucket = assign_buckets(score, 4)
    assert sorted(np.bincount(bucket).tolist()) == [2, 3, 3, 3]
    # bucket order follows score order: every score in bucket b <= every score in bucket b+1
    for b in range(3):
        assert score[bucket == b].max() <= score[bucket == b + 1].min()
    assert bucket[np.argmin(score)] == 0 and bucket[np.argmax(score)] == 3
    with pytest.raises(ValueError, match="num_buckets=12"):
        assign_buckets(score, 12)


def test_manifest_files(tmp_path, shards, tokenizer_path):
    folder, _ = shards
    score_windows(folder, tokenizer_path, tmp_path / "s.parquet", seq_len=SEQ,
                  cfg=ScoresConfig(), vocab_size=384)
    summary = build_manifest(tmp_path / "s.parquet", tmp_path / "c.parquet", tmp_path / "c.json",
                             tmp_path / "c.png", cfg=ManifestConfig(num_buckets=5))
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column_names == ["shard", "start", "score", "bucket"]
    counts = [b["count"] for b in summary["buckets"]]
    assert sum(counts) == table.num_rows == 43 + 20 and max(counts) - min(counts) <= 1
    assert summary["edges"] == sorted(summary["edges"]) and len(summary["edges"]) == 4
    meta = read_metadata(tmp_path / "c.parquet")
    assert (meta["scorer"], meta["seq_len"], meta["num_buckets"]) == ("unigram", SEQ, 5)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
