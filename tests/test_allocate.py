"""Bit allocation: the knapsack is exact, fits its budget, and rd beats uniform at its bytes."""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pgolf.model.checkpoint import save_model
from pgolf.model.gpt import GPT, GPTConfig, quantizable_matrices
from pgolf.quant.allocate import (
    RDConfig,
    UniformConfig,
    build_allocation,
    damage_curves,
    knapsack,
    rd_choice,
)


def brute_force(costs, damages, budget):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[k] for c, k in zip(costs, picks, strict=True))
        dmg = sum(d[k] for d, k in zip(damages, picks, strict=True))
        if cost <= budget and (best is None or dmg < best[0] - 1e-12):
            best = (dmg, picks)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs = [sorted(rng.integers(1, 30, size=3).tolist()) for _ in range(4)]
    damages = [sorted(rng.random(3).tolist(), reverse=True) for _ in range(4)]
    budget = int(rng.integers(4, 100))
    expected = brute_force(costs, damages, budget)
    picks = knapsack(costs, damages, budget)
    if expected is None:
        assert picks is None
        return
    assert sum(c[k] for c, k in zip(costs, picks, strict=True)) <= budget
    got = sum(d[k] for d, k in zip(damages, picks, strict=True))
    assert got == pytest.approx(expected[0])


def rows_for(names, rng, bits=(4, 5, 6, 7, 8)):
    rows = []
    for name in names:
        size, sensitivity = int(rng.integers(1000, 5000)), float(rng.random() * 1e-2)
        for b in bits:
            rows.append({"matrix": name, "bits": b, "bytes": size * b // 8,
                         "dbpb": sensitivity * 2.0 ** -b + float(rng.normal(0, 1e-6)),
                         "noise_se": 1e-6, "clip_sigmas": 3.0 + b})
    return rows


def test_curves_are_monotone_and_non_negative():
    rows = [{"matrix": "m", "bits": b, "bytes": b, "dbpb": d, "noise_se": 0.0,
             "clip_sigmas": 1.0} for b, d in ((4, 0.3), (5, 0.1), (6, 0.2), (7, -0.01))]
    curve = damage_curves(rows)["m"]
    assert [curve[b, 0]["predicted_dbpb"] for b in (4, 5, 6, 7)] == [0.3, 0.2, 0.2, 0.0]


def test_rd_fits_the_budget_at_any_resolution():
    rng = np.random.default_rng(0)
    curves = damage_curves(rows_for([f"m{i}" for i in range(12)], rng))
    for budget in (25_000, 32_000, 45_000):
        for resolution in (1, 7, 64):
            choice = rd_choice(curves, budget, resolution)
            assert sum(curves[n][o]["bytes"] for n, o in choice.items()) <= budget
    with pytest.raises(ValueError, match="no allocation fits 100 B"):
        rd_choice(curves, 100, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    save_model(root / "model.safetensors", GPT(cfg), looping=False)
    names = [n for n, _ in quantizable_matrices(cfg)]
    pq.write_table(pa.Table.from_pylist(rows_for(names, np.random.default_rng(1))),
                   root / "sensitivity.parquet")
    return root


def test_rd_beats_uniform_at_uniform_bytes(tiny_run):
    model, table = tiny_run / "model.safetensors", tiny_run / "sensitivity.parquet"
    uniform = build_allocation(model, table, "uniform", tiny_run / "uniform.json",
                               cfg=UniformConfig())
    assert set(uniform["bits"].values()) == {6, 8} and uniform["budget"] is None
    # a stand-in for uniform's artifact: its predicted bytes plus what grouping saved
    artifact = {"artifact_bytes": uniform["predicted"]["bytes"] - 50}
    (tiny_run / "uniform_artifact.json").write_text(json.dumps(artifact))
    rd = build_allocation(model, table, "rd", tiny_run / "rd.json",
                          cfg=RDConfig(budget="policy:uniform"),
                          reference={"allocation": tiny_run / "uniform.json",
                                     "artifact": tiny_run / "uniform_artifact.json"})
    assert rd["budget"]["bytes"] == artifact["artifact_bytes"]
    assert rd["predicted"]["bytes"] <= artifact["artifact_bytes"]
    assert rd["predicted"]["dbpb"] < uniform["predicted"]["dbpb"]
    assert set(rd["bits"].values()) != {6, 8}  # it moved bits between tensors
    assert rd["clip_sigmas"] == {n: 3.0 + b for n, b in rd["bits"].items()}
    assert json.loads((tiny_run / "rd.json").read_text())["predicted"] == rd["predicted"]


def test_budget_errors(tiny_run):
    with pytest.raises(ValueError, match="'policy:rd' would be rd's own"):
        RDConfig(budget="policy:rd")
    with pytest.raises(ValueError, match="expected bytes, 'challenge'"):
        RDConfig(budget="lots")
    with pytest.raises(ValueError, match="needs that policy's allocation"):
        build_allocation(tiny_run / "model.safetensors", tiny_run / "sensitivity.parquet", "rd",
                         tiny_run / "x.json", cfg=RDConfig(budget="policy:uniform"))
    assert not (tiny_run / "x.json").exists()


def test_challenge_budget_spends_on_the_most_bits(tiny_run):
    rd = build_allocation(tiny_run / "model.safetensors", tiny_run / "sensitivity.parquet", "rd",
                          tiny_run / "rd_challenge.json", cfg=RDConfig(budget="challenge"),
                          code_bytes=54_321)
    assert set(rd["bits"].values()) == {8}  # 16 MB is far more than this tiny model needs
    assert rd["budget"]["bytes"] == 16_000_000 - 54_321
    assert "54,321 B code" in rd["budget"]["source"]
    with pytest.raises(ValueError, match="'challenge' needs the code bytes"):
        build_allocation(tiny_run / "model.safetensors", tiny_run / "sensitivity.parquet", "rd",
                         tiny_run / "rd_x.json", cfg=RDConfig(budget="challenge"))
    assert 0 < rd["predicted"]["fixed_bytes"] < 10_000
