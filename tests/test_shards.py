"""The shard format, checked against a reader and writer written only from its description."""

import struct

import numpy as np
import pytest

from pgolf.data.shards import (
    HEADER_BYTES,
    ShardWriter,
    SplitStats,
    read_shard,
    shard_bytes,
    write_shard,
)


# --- an independent implementation, from the format description alone -------------------------
# header: 256 little-endian int32 (magic 20240520, version 1, token count, zeros), then uint16 LE.
def spec_write(path, tokens):
    header = struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))


def spec_read(path):
    data = path.read_bytes()
    magic, version, count = struct.unpack_from("<3i", data)
    assert (magic, version) == (20240520, 1)
    assert len(data) == 1024 + 2 * count
    return list(struct.unpack_from(f"<{count}H", data, 1024))


TOKENS = [1, 0, 65535, 300, 2, 1, 7, 256, 40000]


def test_pgolf_shards_read_by_the_spec_reader(tmp_path):
    write_shard(tmp_path / "a.bin", np.array(TOKENS))
    assert spec_read(tmp_path / "a.bin") == TOKENS


def test_spec_shards_read_by_pgolf_and_byte_identical(tmp_path):
    spec_write(tmp_path / "spec.bin", TOKENS)
    assert read_shard(tmp_path / "spec.bin").tolist() == TOKENS
    write_shard(tmp_path / "ours.bin", read_shard(tmp_path / "spec.bin"))
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "spec.bin").read_bytes()


def test_writer_returns_sha256_of_the_bytes(tmp_path):
    import hashlib

    digest = write_shard(tmp_path / "a.bin", np.array(TOKENS))
    assert digest == hashlib.sha256(shard_bytes(np.array(TOKENS))).hexdigest()


def test_documents_run_across_shard_boundaries(tmp_path):
    stats = SplitStats()
    writer = ShardWriter(tmp_path, "train", shard_tokens=4, stats=stats)
    stream = np.arange(11, dtype="<u2")
    for piece in (stream[:3], stream[3:9], stream[9:]):  # "documents" of uneven length
        writer.write(piece)
    writer.flush()
    names = [s["file"] for s in stats.shards]
    assert names == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [s["tokens"] for s in stats.shards] == [4, 4, 3]
    joined = sum((spec_read(tmp_path / n) for n in names), [])
    assert joined == stream.tolist()


def test_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "a.bin", np.array([1, 65536]))
    assert not (tmp_path / "a.bin").exists()


def corrupt(tmp_path, how):
    path = tmp_path / "bad.bin"
    spec_write(path, TOKENS)
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = struct.pack("<i", 12345)
    elif how == "version":
        data[4:8] = struct.pack("<i", 2)
    elif how == "truncated":
        data = data[:-3]
    elif how == "header":
        data = data[:100]
    elif how == "trailing":
        data += b"\0\0"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how,words", [
    ("magic", ["wrong magic", "12345"]),
    ("version", ["version", "2"]),
    ("truncated", ["size", str(HEADER_BYTES + 2 * len(TOKENS) - 3), "truncated"]),
    ("header", ["truncated header", "100 bytes"]),
    ("trailing", ["size", str(HEADER_BYTES + 2 * len(TOKENS) + 2)]),
])
def test_bad_shards_name_the_file_and_value(tmp_path, how, words):
    path = corrupt(tmp_path, how)
    with pytest.raises(ValueError) as err:
        read_shard(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_missing_shard(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_shard(tmp_path / "nope.bin")
