"""The sensitivity sweep's cached fast path equals full evaluations with the matrix swapped in."""

import math

import pytest
import torch

from pgolf.model.gpt import GPT, GPTConfig
from pgolf.quant.gptq import GPTQConfig, dequantize
from pgolf.quant.sweep import (
    Subset,
    SweepConfig,
    amplification,
    block_groups,
    first_position,
    prefix_cache,
    sweep_cost,
    sweep_groups,
    sweep_matrix,
    window_nlls,
)


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
    subset = Subset(batches, 1000)
    return model, subset, window_nlls(model, prefix_cache(model, subset, 0), 0)


def full_nll(model, batches):
    with torch.no_grad():
        return sum(float(model(x, y, reduction="none").double().sum()) for x, y in batches)


@pytest.mark.parametrize("name", ["blocks.2.mlp.fc.weight", "blocks.1.attn.c_v.weight",
                                  "tok_emb.weight"])
def test_fast_path_equals_full_evaluation(setup, name):
    model, subset, base_windows = setup
    batches = subset.batches
    H = torch.eye(64 if "mlp.proj" in name else 32)
    cfg, gptq = SweepConfig(bits=[3, 6]), GPTQConfig()
    rows = sweep_matrix(model, name, H, subset, base_windows, cfg=cfg, gptq=gptq)
    base = full_nll(model, batches)
    assert float(base_windows.sum()) == pytest.approx(base, rel=1e-9)
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
    model, _, _ = setup
    assert model.cfg.layer_sequence(True) == [0, 1, 1, 2]
    assert first_position(model, "blocks.2.mlp.fc.weight") == 3
    assert first_position(model, "blocks.1.attn.c_q.weight") == 1
    assert first_position(model, "tok_emb.weight") == 0
    names = ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight", "blocks.2.attn.c_q.weight"]
    # depth 4 + head = 5; per matrix the prefix once and 5 suffixes, plus one shared baseline
    spent = (0 + 5 * 5) + (1 + 5 * 4) + (3 + 5 * 2) + 5
    assert sweep_cost(model, names) == pytest.approx(spent / (5 * 5 * 3))
    assert sweep_cost(model, names) < sweep_cost(model, names[:1])  # later layers are cheaper


def test_block_groups_keep_the_loop_span_together():
    record = GPTConfig(num_layers=11, loop_start=4, loop_end=5, num_loops=2)
    groups = block_groups(record, looping=True)
    assert [g["layers"] for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert [g["looped"] for g in groups] == [False, False, True, False, False, False]
    demo = GPTConfig(num_layers=4, loop_start=1, loop_end=2, num_loops=1)
    assert [g["layers"] for g in block_groups(demo, looping=True)] == [[0], [1, 2], [3]]
    # looping off (as before loop_enable_at): no group is looped, plain adjacent pairs
    assert [(g["layers"], g["looped"]) for g in block_groups(demo, looping=False)] == [
        ([0, 1], False), ([2, 3], False)]


def test_group_sweep_equals_full_evaluation(setup):
    model, subset, base = setup
    params = dict(model.named_parameters())
    hessians = {n: torch.eye(p.shape[1]) for n, p in params.items()
                if n.startswith("blocks.") and n.endswith(".weight") and p.ndim == 2}
    gptq = GPTQConfig()
    rows, factors = sweep_groups(model, hessians, subset, base,
                                 cfg=SweepConfig(group_bits=[3], bootstrap=200), gptq=gptq)
    assert [r["group"] for r in rows] == ["0", "1", "2"] and [r["looped"] for r in rows] == [
        False, True, False]
    row = rows[1]  # the looped layer 1: its first use is at virtual position 1
    names = [n for n in hessians if n.startswith("blocks.1.")]
    assert row["params"] == sum(params[n].numel() for n in names)
    originals = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n].copy_(dequantize(*gptq.quantize(originals[n], hessians[n], 3)))
        quantized = full_nll(model, subset.batches)
        for n in names:
            params[n].copy_(originals[n])
    expected = (quantized - float(base.sum())) / math.log(2) / subset.num_bytes
    assert row["dbpb"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert factors[0]["bits"] == 3 and factors[0]["amplification"] is not None


def test_amplification_factor_and_its_interval():
    torch.manual_seed(1)
    windows = 400
    noise = [torch.randn(windows, dtype=torch.float64) * 0.01 for _ in range(3)]
    # per-window damage: the looped group hurts 3x per parameter
    diffs = {("0-1", 6): (1.0 + noise[0], 1000, False), ("2-3", 6): (2.0 + noise[1], 2000, False),
             ("4-5", 6): (3.0 + noise[2], 1000, True)}
    result = amplification(diffs, 6, resamples=500)
    assert result["amplification"] == pytest.approx(3.0, rel=0.01)
    low, high = result["ci95"]
    assert low < result["amplification"] < high and high - low < 0.05
    none = amplification({k: v for k, v in diffs.items() if not v[2]}, 6, resamples=10)
    assert none["amplification"] is None and "looped" in none["why_none"]


def test_a_baseline_from_another_kind_of_device_is_refused(setup, tmp_path):
    import numpy as np
    import pyarrow as pa

    from pgolf.data.scores import write_table
    from pgolf.quant.sweep import read_baseline

    _, subset, base = setup
    path = tmp_path / "sweep_baseline.parquet"
    meta = {"windows": subset.windows, "bytes_scored": subset.num_bytes, "device": "cuda"}
    write_table(pa.table({"window": np.arange(len(base)), "nll_nats": base.numpy()}), path, meta)
    assert torch.equal(read_baseline(path, subset, "cuda"), base)
    with pytest.raises(ValueError, match=r"sweep_baseline.parquet: baseline scored on cuda, but "
                                         r"this sweep job runs on cpu"):
        read_baseline(path, subset, "cpu")


def test_device_settings_are_checked():
    from pgolf.train.distributed import pick_device

    assert pick_device("cpu", "sweep.device").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto", "sweep.device").type == "cpu"
        with pytest.raises(ValueError, match="sweep.device = 'cuda' but no CUDA device"):
            pick_device("cuda", "sweep.device")
