"""The sensitivity sweep's cached fast path equals full evaluations with the matrix swapped in."""

import math

import pytest
import torch

from pgolf.model.gpt import GPT, GPTConfig
from pgolf.quant.gptq import GPTQConfig, dequantize
from pgolf.quant.sweep import SweepConfig, first_position, sweep_cost, sweep_matrix


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1,
                          loop_start=1, loop_end=1, num_loops=1, skip_gates=True, xsa_last_n=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.1)
    model.looping = True
    model.eval()
    batches = [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(3)]
    return model, batches


def full_nll(model, batches):
    with torch.no_grad():
        return sum(float(model(x, y, reduction="none").double().sum()) for x, y in batches)


@pytest.mark.parametrize("name", ["blocks.2.mlp.fc.weight", "blocks.1.attn.c_v.weight",
                                  "tok_emb.weight"])
def test_fast_path_equals_full_evaluation(setup, name):
    model, batches = setup
    H = torch.eye(64 if "mlp.proj" in name else 32)
    cfg, gptq = SweepConfig(bits=[3, 6]), GPTQConfig()
    rows = sweep_matrix(model, name, H, batches, cfg=cfg, gptq=gptq, num_bytes=1000)
    base = full_nll(model, batches)
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    for row in rows:
        codes, scales = gptq.quantize(original, H, row["bits"])
        with torch.no_grad():
            param.copy_(dequantize(codes, scales))
        expected = (full_nll(model, batches) - base) / math.log(2) / 1000
        with torch.no_grad():
            param.copy_(original)
        assert row["dbpb"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert row["noise_se"] > 0 and row["bytes"] > 0
        assert row["weighted_error"] <= row["rtn_weighted_error"] + 1e-9
    assert torch.equal(param, original)  # the sweep leaves the model as it found it
    assert abs(rows[0]["dbpb"]) > abs(rows[1]["dbpb"])  # 3 bits move BPB more than 6 (random
    # targets: the sign of a change means nothing here)


def test_first_positions_and_cost(setup):
    model, _ = setup
    assert model.cfg.layer_sequence(True) == [0, 1, 1, 2]
    assert first_position(model, "blocks.2.mlp.fc.weight") == 3
    assert first_position(model, "blocks.1.attn.c_q.weight") == 1
    assert first_position(model, "tok_emb.weight") == 0
    names = ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight", "blocks.2.attn.c_q.weight"]
    assert sweep_cost(model, names) == pytest.approx((5 + 4 + 2) / 3 / 5)
