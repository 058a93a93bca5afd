"""Skips, damage and the analysis table: hand-checked statistics, init baselines, refusals."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pgolf.analysis.damage import damage_row
from pgolf.analysis.skips import encoder_shares, skip_pairs, skip_parameters, skip_rows
from pgolf.analysis.table import read_analysis, write_analysis
from pgolf.model.gpt import GPT, GPTConfig
from pgolf.quant.sweep import Subset

pytestmark = pytest.mark.usefixtures("one_thread")

LOOPED = GPTConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1,
                   loop_start=1, loop_end=2, num_loops=1, skip_gates=True)


def looped_model(trained: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(LOOPED).eval()
    model.looping = True
    if trained:  # move every parameter off its initial value, as training would
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def subset(windows: int = 4, seq_len: int = 16) -> Subset:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, LOOPED.vocab_size, (windows, seq_len + 1), generator=g)
    return Subset([(tokens[:, :-1], tokens[:, 1:])], num_bytes=3 * windows * seq_len)


def test_skips_pair_encoder_and_decoder_positions_last_in_first_out():
    model = looped_model(trained=False)  # virtual layers [0, 1, 2, 1, 2, 3]
    assert skip_pairs(model) == [(2, 3), (1, 4), (0, 5)]
    rows = skip_parameters(model)
    assert [(r["encoder_layer"], r["decoder_layer"]) for r in rows] == [(2, 1), (1, 2), (0, 3)]


def test_a_fresh_model_sits_at_its_initialisation():
    rows = skip_rows(looped_model(trained=False), subset())
    for row in rows:
        assert row["distance_from_init"] == 0.0
        assert row["weight_norm"] == row["init_norm"] == pytest.approx(math.sqrt(32))
        assert row["gate_mean"] == row["init_gate_mean"] == 0.5
        assert row["note"] == "at its initial value (distance from init 0)"


def test_a_trained_model_reports_how_far_each_skip_moved():
    model = looped_model(trained=True)
    rows = skip_rows(model, subset())
    for j, row in enumerate(rows):
        moved = (model.skip_weights[j].detach().double() - 1).norm()
        assert row["distance_from_init"] == pytest.approx(float(moved), rel=1e-12) and moved > 0
        assert row["note"].startswith("moved ")
        g = torch.sigmoid(model.skip_gates[j].detach().double())
        assert (row["gate_min"], row["gate_max"]) == pytest.approx((float(g.min()),
                                                                    float(g.max())))


def test_the_encoder_share_matches_the_mixing_step_by_hand():
    model = looped_model(trained=True)
    x = subset().batches[0][0]
    with torch.no_grad():
        state = model.advance(model.initial_state(x), 0, 3)  # entering decoder position 3
        w, s, g = model.skip_weights[0], state.stack[-1], torch.sigmoid(model.skip_gates[0])
        share = ((1 - g) * w * s).norm(dim=-1) / (g * state.x + (1 - g) * w * s).norm(dim=-1)
    assert float(encoder_shares(model, [x])[0]) == pytest.approx(float(share.mean()), rel=1e-5)


def test_ablating_a_skip_equals_running_without_it():
    model = looped_model(trained=True)
    data = subset()
    rows = skip_rows(model, data)
    x, y = data.batches[0]
    with torch.no_grad():
        base = model(x, y, reduction="none").double().sum()
        model.skip_gates[2] = math.inf  # g = 1: the decoder stream alone
        ablated = model(x, y, reduction="none").double().sum()
    expected = float(ablated - base) / math.log(2) / data.num_bytes
    assert rows[2]["ablation_dbpb"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert rows[2]["ablation_noise_se"] > 0
    with pytest.raises(ValueError, match="no U-Net skips"):
        skip_rows(GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2,
                                num_kv_heads=1, skips=False)), data)


def test_an_analysis_table_keeps_its_definition_and_null(tmp_path):
    out = tmp_path / "t.parquet"
    write_analysis([{"a": 1.0}], out, definition="what", null="against what", windows=3)
    rows, meta = read_analysis(out)
    assert rows == [{"a": 1.0}]
    assert (meta["definition"], meta["null"], meta["windows"]) == ("what", "against what", 3)
    with pytest.raises(AssertionError):
        write_analysis([{"a": 1.0}], out, definition="what", null="")


def eval_json(path, nll, num_bytes=1000):
    chunks = {"nll_nats": nll, "tokens": [100] * len(nll)}
    bpb = sum(nll) / math.log(2) / num_bytes
    path.write_text(json.dumps({"mode": path.stem, "bpb": bpb, "bytes": num_bytes,
                                "chunks": chunks}))
    return bpb


def test_damage_pairs_the_prediction_with_the_measurement(tmp_path):
    bits = {"blocks.0.mlp.fc.weight": 4, "tok_emb.weight": 8}
    sweep = [{"matrix": m, "bits": b, "dbpb": d} for m, b, d in [
        ("blocks.0.mlp.fc.weight", 4, 0.003), ("blocks.0.mlp.fc.weight", 8, -0.0002),
        ("tok_emb.weight", 8, -0.0001)]]
    pq.write_table(pa.Table.from_pylist(sweep), tmp_path / "sens.parquet")
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"bits": bits, "predicted": {"dbpb": 0.003,
                                                             "dbpb_noise_se": 0.0004}}))
    before = eval_json(tmp_path / "prequant.json", [700.0, 690.0, 710.0, 705.0])
    after = eval_json(tmp_path / "roundtrip.json", [701.0, 692.0, 711.0, 707.0])
    row = damage_row("rd", alloc, tmp_path / "prequant.json", tmp_path / "roundtrip.json",
                     tmp_path / "sens.parquet")
    assert row["measured_dbpb"] == pytest.approx(after - before, rel=1e-12)
    assert row["predicted_raw"] == pytest.approx(0.003 - 0.0001)  # unclipped sum
    assert row["measured_se"] > 0 and row["chunks"] == 4
    assert row["ratio"] == pytest.approx(row["measured_dbpb"] / 0.003)
    alloc.write_text(json.dumps({"bits": {**bits, "blocks.0.mlp.fc.weight": 6},
                                 "predicted": {"dbpb": 0.003, "dbpb_noise_se": 0.0004}}))
    with pytest.raises(ValueError, match=r"sens.parquet: no sweep row for .*fc.weight@6"):
        damage_row("rd", alloc, tmp_path / "prequant.json", tmp_path / "roundtrip.json",
                   tmp_path / "sens.parquet")
