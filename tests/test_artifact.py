"""The packed artifact: exact round trip, exact byte accounting, and corrupt files refused."""

import json
import struct
import zlib

import brotli
import numpy as np
import pytest
import torch

from pgolf.quant.artifact import (
    MAGIC,
    PREFIX,
    Quantized,
    decode_codes,
    encode_codes,
    pack_artifact,
    quantized_bytes,
    read_artifact,
    write_artifact,
)
from pgolf.quant.gptq import round_to_nearest, sdclip_scales


def tensors():
    torch.manual_seed(0)
    out = {}
    for name, shape, bits in (("blocks.0.mlp.fc.weight", (64, 32), 6),
                              ("tok_emb.weight", (100, 32), 8), ("blocks.0.attn.c_q.weight",
                                                                 (32, 32), 4)):
        W = torch.randn(shape) * 0.05
        scale = sdclip_scales(W, bits=bits, clip_sigmas=12.0)
        out[name] = Quantized(round_to_nearest(W, scale, bits=bits), scale, bits)
    out["blocks.0.attn_scale"] = torch.rand(32)
    out["skip_weights"] = torch.rand(2, 32)
    return out


def sizes(parts: dict) -> dict[str, int]:
    return {k: v["codes"] + v["scales"] for k, v in parts.items()
            if isinstance(v, dict) and "codes" in v}


def test_round_trip_is_exact(tmp_path):
    original = tensors()
    info = write_artifact(tmp_path / "a.pgz", original, {"config": {"layers": 1}})
    loaded, meta = read_artifact(tmp_path / "a.pgz")
    assert meta == {"config": {"layers": 1}} and list(loaded) == list(original)
    for name, t in original.items():
        if isinstance(t, Quantized):
            assert torch.equal(loaded[name].codes, t.codes) and loaded[name].bits == t.bits
            assert torch.equal(loaded[name].scales, t.scales)
        else:
            assert torch.equal(loaded[name], t.to(torch.float16).float())
    assert info["bytes"] == (tmp_path / "a.pgz").stat().st_size
    parts = info["breakdown"]
    total = parts["header"] + parts["fp16 group"]["bytes"] + sum(sizes(parts).values())
    assert total == info["bytes"]


def test_quantized_bytes_is_each_tensors_exact_share(tmp_path):
    original = tensors()
    info = write_artifact(tmp_path / "a.pgz", original, {})
    lone = {n: quantized_bytes(t.codes.numpy(), t.scales.numpy(), t.bits)
            for n, t in original.items() if isinstance(t, Quantized)}
    assert lone == sizes(info["breakdown"])
    parts = info["breakdown"]
    assert info["bytes"] == sum(lone.values()) + parts["fp16 group"]["bytes"] + parts["header"]
    t = original["tok_emb.weight"]
    alone = write_artifact(tmp_path / "b.pgz", {"e": t}, {})
    assert alone["bytes"] - alone["breakdown"]["header"] == lone["tok_emb.weight"]


def test_codes_round_trip_alone_in_any_shape():
    rng = np.random.default_rng(0)
    for shape in [(3, 4, 5), (7,), (), (0, 3)]:
        codes = rng.integers(-7, 8, size=shape).astype(np.int8)
        _, blob = encode_codes(codes, 4)
        back = decode_codes(blob, shape, 4)
        assert back.shape == codes.shape and np.array_equal(back, codes)


def test_codes_are_stored_below_one_byte_per_weight(tmp_path):
    W = torch.randn(512, 256) * 0.05
    scale = sdclip_scales(W, bits=6, clip_sigmas=12.85)
    info = write_artifact(tmp_path / "a.pgz", {"w": Quantized(round_to_nearest(W, scale, bits=6),
                                                              scale, 6)}, {})
    assert info["breakdown"]["w"]["codes"] < 0.5 * W.numel()  # int6 at 12.85 sigma: ~3.2 bits


def test_bad_input_is_refused():
    codes = torch.full((4, 4), 40, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside int6"):
        pack_artifact({"w": Quantized(codes, torch.ones(4, dtype=torch.float16), 6)}, {})
    with pytest.raises(ValueError, match="3 scales for 4 rows"):
        quantized_bytes(np.zeros((4, 4)), np.ones(3), 6)


def rewritten(data: bytes, edit) -> bytes:
    """The artifact after edit(header, sections) -> sections, its checksums made to match, as a
    faulty writer would produce it."""
    _, version, header_len, _ = PREFIX.unpack_from(data)
    header = json.loads(brotli.decompress(data[PREFIX.size:PREFIX.size + header_len]))
    body = edit(header, data[PREFIX.size + header_len:])
    header["crc32"] = zlib.crc32(body)
    packed = brotli.compress(json.dumps(header).encode())
    return PREFIX.pack(MAGIC, version, len(packed), zlib.crc32(packed)) + packed + body


def flip_inside_first_section(header: dict, body: bytes) -> bytes:
    body = bytearray(body)
    body[len(body) // 8] ^= 0x5A
    return bytes(body)


def flip_inside_fp16_group(header: dict, body: bytes) -> bytes:
    """Its bit header's length: the raw low bits inside carry no check of their own (the
    sections' checksum covers them)."""
    body = bytearray(body)
    body[len(body) - header["lengths"][-1]] ^= 0x5A
    return bytes(body)


def malformed_tensor_list(header: dict, body: bytes) -> bytes:
    header["tensors"][0] = {"name": header["tensors"][0][0]}
    return body


@pytest.mark.parametrize("damage,words", [
    (lambda d: d[:5], ["shorter than its prefix"]),
    (lambda d: b"NOTPGOLF" + d[8:], ["wrong magic"]),
    (lambda d: d[:8] + b"\x09\x00" + d[10:], ["unsupported version 9"]),
    (lambda d: d[:10] + struct.pack("<I", 10 ** 6) + d[14:], ["runs past the file end"]),
    (lambda d: d[:PREFIX.size + 3] + bytes([d[PREFIX.size + 3] ^ 1]) + d[PREFIX.size + 4:],
     ["header fails its checksum"]),
    (lambda d: d[:-40], ["truncated"]),
    (lambda d: d + b"\x00", ["padded"]),
    (lambda d: d[:-40] + bytes(b ^ 0x5A for b in d[-40:]), ["checksum"]),
    (lambda d: rewritten(d, flip_inside_first_section), ["corrupt"]),
    (lambda d: rewritten(d, flip_inside_fp16_group), ["corrupt"]),
    (lambda d: rewritten(d, malformed_tensor_list), ["header does not list"]),
])
def test_corrupt_artifacts_are_refused(tmp_path, damage, words):
    write_artifact(tmp_path / "a.pgz", tensors(), {})
    data = (tmp_path / "a.pgz").read_bytes()
    assert data.startswith(MAGIC)
    (tmp_path / "bad.pgz").write_bytes(damage(data))
    with pytest.raises(ValueError) as err:
        read_artifact(tmp_path / "bad.pgz")
    assert "bad.pgz" in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("codec", ["freezedry", "sparse24"])
def test_optional_codec_tensors_round_trip(tmp_path, codec):
    import importlib

    from pgolf.quant.artifact import Encoded
    from pgolf.quant.codebytes import code_bytes

    module = importlib.import_module(f"pgolf.quant.{codec}")
    torch.manual_seed(0)
    W = torch.randn(16, 32) * 0.05
    rep = module.encode(W, torch.eye(32), bits=4, clip_sigmas=6.5)
    original = tensors()
    original["blocks.0.mlp.proj.weight"] = Encoded(codec, (16, 32), 4, module.pack(rep))
    info = write_artifact(tmp_path / "a.pgz", original, {})
    loaded, _ = read_artifact(tmp_path / "a.pgz")
    assert set(loaded) == set(original)
    assert torch.equal(loaded["blocks.0.mlp.proj.weight"], module.dequantize(rep))
    assert info["breakdown"]["blocks.0.mlp.proj.weight"]["codec"] == codec
    # the codec's source counts as code bytes (the exported train_gpt.py embeds it) only when
    # the artifact uses it
    spec = {"run": "x", "mode": "ttt", "seeds": [1], "train": {}, "model": {}}
    plain = code_bytes({**spec, "pack": {"matrix_codec": "gptq"}}, names=["a"])
    used = code_bytes({**spec, "pack": {"matrix_codec": codec}}, names=["a"])
    assert f"pgolf/quant/{codec}.py" not in plain["files"]
    assert f"pgolf/quant/{codec}.py" in used["files"] and used["bytes"] > plain["bytes"]


def test_passthrough_floats_of_any_shape_and_sign_round_trip(tmp_path):
    torch.manual_seed(1)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, -6e-8, 1e-7, 1.0])
    original = {"mix": torch.stack([1 + 0.1 * torch.randn(40), 0.1 * torch.randn(40)]),
                "gain": torch.tensor(2.5), "cube": torch.randn(2, 3, 4), "empty": torch.zeros(0),
                "special": special, "ones": torch.ones(300)}
    info = write_artifact(tmp_path / "a.pgz", original, {})
    loaded, _ = read_artifact(tmp_path / "a.pgz")
    for name, t in original.items():
        assert loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t.to(torch.float16).float()), name
    nan = write_artifact(tmp_path / "n.pgz", {"nan": torch.tensor([float("nan"), 1.0])}, {})
    assert nan["bytes"] and torch.isnan(read_artifact(tmp_path / "n.pgz")[0]["nan"][0])
    # 300 ones cost a few bytes: no low bits are kept where a table covers every value
    assert info["breakdown"]["fp16 group"]["bytes"] < 2 * (80 + 24 + 1 + 8 + 1 + 300 // 8)
