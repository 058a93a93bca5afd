"""The packed artifact: exact round trip, smallest codec per section, and corrupt files refused."""

import pytest
import torch

from pgolf.quant.artifact import MAGIC, Quantized, read_artifact, write_artifact
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


def test_round_trip_is_exact(tmp_path):
    original = tensors()
    info = write_artifact(tmp_path / "a.pgz", original, {"config": {"layers": 1}})
    loaded, meta = read_artifact(tmp_path / "a.pgz")
    assert meta == {"config": {"layers": 1}} and set(loaded) == set(original)
    for name, t in original.items():
        if isinstance(t, Quantized):
            assert torch.equal(loaded[name].codes, t.codes) and loaded[name].bits == t.bits
            assert torch.equal(loaded[name].scales, t.scales)
        else:
            assert torch.equal(loaded[name], t.to(torch.float16).float())
    assert info["bytes"] == (tmp_path / "a.pgz").stat().st_size
    parts = info["breakdown"]
    total = parts["header"] + parts["fp16 group"]["bytes"] + sum(
        v["codes"] + v["scales"] for k, v in parts.items() if isinstance(v, dict) and "codes" in v)
    assert total == info["bytes"]


def test_codes_are_stored_below_one_byte_per_weight(tmp_path):
    W = torch.randn(512, 256) * 0.05
    scale = sdclip_scales(W, bits=6, clip_sigmas=12.85)
    info = write_artifact(tmp_path / "a.pgz", {"w": Quantized(round_to_nearest(W, scale, bits=6),
                                                              scale, 6)}, {})
    assert info["breakdown"]["w"]["codes"] < 0.5 * W.numel()  # int6 at 12.85 sigma: ~3.2 bits


@pytest.mark.parametrize("damage,words", [
    (lambda d: d[:5], ["shorter than its prefix"]),
    (lambda d: b"NOTPGOLF" + d[8:], ["wrong magic"]),
    (lambda d: d[:8] + b"\x09\x00" + d[10:], ["unsupported version 9"]),
    (lambda d: d[:-40], ["truncated"]),
    (lambda d: d[:-40] + bytes(b ^ 0x5A for b in d[-40:]), ["checksum"]),
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

