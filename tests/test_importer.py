"""`pgolf import`: upstream state dicts (baseline/R0409 names, the SOTA record's banks) saved with
torch.save become pgolf checkpoints that compute the same logits."""

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pgolf.cli import main
from pgolf.model.checkpoint import load_model, read_header
from pgolf.model.gpt import GPT, GPTConfig
from pgolf.model.importer import import_checkpoint, to_pgolf

CFG = dict(vocab_size=260, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2,
           skip_gates=True, rope_dims=4, xsa_last_n=1)


def trained(cfg: GPTConfig) -> GPT:
    """A GPT whose every parameter is random (the zero-initialised projections too)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def baseline_names(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict under the baseline / R0409 names (train_gpt.py's GPT and Block)."""
    sd, out = model.state_dict(), {"tok_emb.weight": model.tok_emb.weight.detach().clone()}
    out["skip_weights"], out["skip_gates"] = sd["skip_weights"], sd["skip_gates"]
    for i in range(model.cfg.num_layers):
        for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight",
                     "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight",
                     "mlp.proj.weight"):
            out[f"blocks.{i}.{name}"] = sd[f"blocks.{i}.{name}"]
        out[f"blocks.{i}.attn.rotary.inv_freq"] = torch.ones(2)  # if saved, a constant
    return out


def sota_names(model: GPT) -> dict[str, torch.Tensor]:
    """The SOTA record's names: Q/O, K/V and MLP matrices in banks, one row per layer, and the
    global lane lambdas (here at their initial values: no layer has two lanes)."""
    sd, layers = model.state_dict(), model.cfg.num_layers

    def bank(*parts):
        return torch.stack([sd[f"blocks.{i}.{p}"] for p in parts for i in range(layers)])

    out = {k: v for k, v in baseline_names(model).items()
           if not k.endswith(".weight") or k == "tok_emb.weight"}
    out["qo_bank"] = bank("attn.c_q.weight", "attn.proj.weight")
    out["kv_bank"] = bank("attn.c_k.weight", "attn.c_v.weight")
    out["mlp_up_bank"] = bank("mlp.fc.weight")
    out["mlp_down_bank"] = bank("mlp.proj.weight")
    out["parallel_resid_lambdas"] = torch.full((layers, 2), 1.1)
    out["parallel_post_lambdas"] = torch.ones(layers, 2, 2)
    return out


def roundtrip(tmp_path, cfg, upstream):
    torch.save(upstream, tmp_path / "final_model.pt")
    import_checkpoint(tmp_path / "final_model.pt", cfg, tmp_path / "model.safetensors")
    return load_model(tmp_path / "model.safetensors")


@pytest.mark.parametrize("naming", [baseline_names, sota_names])
def test_upstream_state_dict_round_trips_to_identical_logits(tmp_path, naming):
    cfg = GPTConfig(**CFG, num_loops=1, loop_start=1, loop_end=1)
    model = trained(cfg)
    model.looping = True
    imported = roundtrip(tmp_path, cfg, naming(model))
    assert imported.looping  # the records evaluate with looping on
    idx = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(imported(idx), model(idx))
    header = read_header(tmp_path / "model.safetensors")
    assert json.loads(header["config"]) == asdict(cfg)  # as pgolf's trainer writes it
    assert json.loads(header["imported_from"])["path"] == str(tmp_path / "final_model.pt")


def test_banks_are_sliced_by_layer(tmp_path):
    cfg = GPTConfig(**CFG)
    layers, d = cfg.num_layers, cfg.model_dim
    qo = torch.arange(2 * layers * d * d, dtype=torch.float32).view(2 * layers, d, d)
    mapped, origin, unknown = to_pgolf({"qo_bank": qo}, cfg)
    assert unknown == []
    assert torch.equal(mapped["blocks.2.attn.c_q.weight"], qo[2])
    assert torch.equal(mapped["blocks.0.attn.proj.weight"], qo[layers])  # O follows all Q
    assert origin["blocks.1.attn.proj.weight"] == "qo_bank"


def test_sota_feature_tensors_map_to_the_feature_branch_names():
    cfg = SimpleNamespace(num_layers=4, parallel_lanes=True, parallel_from=2)
    # rows 0, 1: single-lane layers, unused by the record; weight decay shrank them uniformly
    resid, post = torch.full((4, 2), 1.1 * 0.97), torch.full((4, 2, 2), 0.97)
    resid[2:], post[2:] = torch.randn(2, 2), torch.randn(2, 2, 2)
    gate, smear, lam = torch.randn(1, 12), torch.randn(4, 12), torch.randn(1)
    mapped, _, unknown = to_pgolf({"parallel_resid_lambdas": resid,
                                   "parallel_post_lambdas": post, "smear_gate.weight": gate,
                                   "smear_lambda": lam, "blocks.3.attn.attn_gate_w": smear}, cfg)
    assert unknown == []
    assert sorted(mapped) == ["blocks.2.lane_post", "blocks.2.lane_resid", "blocks.3.attn.gate",
                              "blocks.3.lane_post", "blocks.3.lane_resid", "smear_gate",
                              "smear_lambda"]
    assert torch.equal(mapped["blocks.3.lane_resid"], resid[3])
    assert torch.equal(mapped["blocks.2.lane_post"], post[2])
    assert mapped["smear_gate"] is gate and mapped["blocks.3.attn.gate"] is smear


def test_trained_lanes_need_a_two_lane_config():
    cfg = SimpleNamespace(num_layers=3, parallel_lanes=False, parallel_from=None)
    resid = torch.full((3, 2), 1.1 * 0.97)
    resid[2] = torch.tensor([0.7, 1.3])  # layer 2 was a two-lane layer in the record
    with pytest.raises(ValueError, match=r"parallel_resid_lambdas: rows \[2\] were trained"):
        to_pgolf({"parallel_resid_lambdas": resid}, cfg)


def test_unknown_missing_extra_and_misshapen_tensors_are_all_named(tmp_path):
    cfg = GPTConfig(**CFG)
    upstream = sota_names(trained(cfg))
    upstream["bigram.embed.weight"] = torch.zeros(4, 4)  # a feature pgolf does not have
    del upstream["blocks.1.attn.q_gain"]
    upstream["smear_gate.weight"] = torch.zeros(1, 12)  # the SOTA gate: not in today's GPT
    upstream["kv_bank"] = upstream["kv_bank"][:, :8]  # K/V of the wrong width
    upstream["skip_weights"] = torch.ones(2, 32)
    torch.save(upstream, tmp_path / "final_model.pt")
    with pytest.raises(ValueError) as err:
        import_checkpoint(tmp_path / "final_model.pt", cfg, tmp_path / "model.safetensors")
    message = str(err.value)
    assert "unknown tensor names (no pgolf counterpart): ['bigram.embed.weight']" in message
    assert "missing tensors the configured model needs: ['blocks.1.attn.q_gain']" in message
    assert "no place for" in message and "['smear_gate']" in message
    assert ("blocks.0.attn.c_k.weight (from kv_bank): shape (8, 32) in the checkpoint, (16, 32) "
            "in the configured model") in message
    assert "skip_weights: shape (2, 32) in the checkpoint, (1, 32) in the configured model" \
        in message
    assert not (tmp_path / "model.safetensors").exists()


def test_bank_with_the_wrong_layer_count():
    cfg = GPTConfig(**CFG)
    with pytest.raises(ValueError, match=r"mlp_up_bank: shape \(2, 128, 32\), expected 1 x "
                                         r"model\.num_layers = 3 rows"):
        to_pgolf({"mlp_up_bank": torch.zeros(2, 128, 32)}, cfg)


class Payload:
    """Unpickling this would create a file: what an untrusted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "extra": Payload(marker)},
               tmp_path / "final_model.pt")
    with pytest.raises(ValueError, match=r"refused by torch\.load\(weights_only=True\)"):
        import_checkpoint(tmp_path / "final_model.pt", GPTConfig(**CFG),
                          tmp_path / "model.safetensors")
    assert not marker.exists()


def test_cli_imports_with_a_pgolf_config(tmp_path, capsys):
    cfg = GPTConfig(**CFG)
    model = trained(cfg)
    torch.save(baseline_names(model), tmp_path / "final_model.pt")
    model_section = {k: v for k, v in CFG.items() if k != "vocab_size"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(
        {"run": "x", "model": model_section, "tokenizer": {"vocab_size": 260}}))
    out = tmp_path / "model.safetensors"
    assert main(["import", str(tmp_path / "final_model.pt"), "--config",
                 str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    assert "looping False" in capsys.readouterr().out
    for name, tensor in load_model(out).state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": model_section}))  # vocab 1024
    assert main(["import", str(tmp_path / "final_model.pt"), "--config",
                 str(tmp_path / "c.yaml"), "--out", str(out)]) == 1
    assert "tok_emb.weight: shape (260, 32) in the checkpoint, (1024, 32)" in \
        capsys.readouterr().err
