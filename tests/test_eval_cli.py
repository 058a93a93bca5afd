"""`python -m pgolf.eval` on real shards, a real tokenizer and real artifacts: the damage-gap
guard against the #1818 settings, torchrun with 2 gloo processes, errors."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from pgolf.data.encode import ShardsConfig, encode_corpus
from pgolf.data.shards import list_shards, read_shard
from pgolf.eval.guard import GuardConfig, check_damage_gap, diagnosis, tensor_damage
from pgolf.io import read_json
from pgolf.model.checkpoint import save_model
from pgolf.model.gpt import GPT, GPTConfig, quantizable_matrices
from pgolf.quant.artifact import Quantized, write_artifact
from pgolf.quant.export import quantize_state
from pgolf.quant.gptq import GPTQConfig

pytestmark = pytest.mark.slow
SEQ = 32
SPEC = {"eval": {"seq_len": SEQ, "stride": 8, "batch_seqs": 16, "max_tokens": 4096},
        "guard": {}, "ttt": {"chunk_tokens": 1024, "epochs": 1, "lr": 0.02, "batch_seqs": 8},
        "lora_ttt": {"chunk_size": 16, "rank": 4, "alpha": 8.0, "lr": 0.003, "warm_start_a": False,
                     "phases": {"num_phases": 0}}}


def seed_bug_dedup(tensors: dict) -> dict:
    """#1818's post-GPTQ value dedup: codes // 2 * 2 (floor division: +1 -> 0, -1 -> -2)."""
    return {n: Quantized(t.codes // 2 * 2, t.scales, t.bits) if isinstance(t, Quantized) else t
            for n, t in tensors.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sotu_texts, tokenizer_path):
    """Shards, a briefly trained tiny model, its default artifact and a #1818-style one."""
    root = tmp_path_factory.mktemp("eval")
    docs = write_jsonl(root / "docs.jsonl", sotu_texts[:12])
    encode_corpus(docs, tokenizer_path, root / "shards", corpus={"count": 12},
                  cfg=ShardsConfig(val_docs=1, shard_tokens=40_000))
    cfg = GPTConfig(vocab_size=384, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1,
                    rope_train_seq_len=SEQ)
    torch.manual_seed(0)
    model = GPT(cfg)
    train = np.concatenate([read_shard(p) for p in list_shards(root / "shards", "train")])
    train = torch.from_numpy(train.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(train) - SEQ - 1, (16,))
        batch = torch.stack([train[s:s + SEQ + 1] for s in starts])
        model(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(root / "model.safetensors", model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    H = {n: torch.eye(state[n].shape[1]) for n, _ in quantizable_matrices(cfg)}
    meta = {"model": dataclasses.asdict(cfg), "looping": False}
    default = {n: 8 if n == "tok_emb.weight" else 6 for n in H}
    write_artifact(root / "default.pgz", quantize_state(state, H, default, GPTQConfig()), meta)
    # #1818: int5 embedding at the int8 clip (20 sigma), then floor-division value dedup
    seed_bits = {n: 5 if n == "tok_emb.weight" else 6 for n in H}
    bad = quantize_state(state, H, seed_bits, GPTQConfig(), clips={"tok_emb.weight": 20.0})
    write_artifact(root / "pr1818.pgz", seed_bug_dedup(bad), meta)
    return root, tokenizer_path


def run_eval(setup, mode, out, *, nproc=1, spec=SPEC, **paths):
    root, tokenizer = setup
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    spec = {**spec, "eval": {**spec["eval"], "nproc": nproc}}
    cmd = [*launcher, "-m", "pgolf.eval", "--mode", mode, "--shards", str(root / "shards"),
           "--tokenizer", str(tokenizer), "--spec", json.dumps(spec), "--out", str(out),
           "--threads", "2"]
    for flag, path in paths.items():
        cmd += [f"--{flag}", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_guard_passes_the_default_artifact_and_trips_on_pr1818(setup, tmp_path):
    root, _ = setup
    assert run_eval(setup, "prequant", tmp_path / "pre.json",
                    model=root / "model.safetensors").returncode == 0
    pre = read_json(tmp_path / "pre.json")
    assert pre["loss"] < np.log(384) - 1.0  # trained: far from uniform
    common = dict(model=root / "model.safetensors", prequant=tmp_path / "pre.json")
    ok = run_eval(setup, "roundtrip", tmp_path / "rt.json", artifact=root / "default.pgz",
                  **common)
    assert ok.returncode == 0, ok.stderr
    rt = read_json(tmp_path / "rt.json")
    assert rt["guard"]["passed"] and 0 <= rt["guard"]["dbpb"] < 0.05
    assert (rt["tokens"], rt["bytes"]) == (pre["tokens"], pre["bytes"])
    bad = run_eval(setup, "roundtrip", tmp_path / "bad.json", artifact=root / "pr1818.pgz",
                   **common)
    assert bad.returncode == 1 and not (tmp_path / "bad.json").exists()
    message = bad.stderr
    assert f"damage-gap guard: artifact {root / 'pr1818.pgz'}" in message
    assert "past eval.guard.max_dbpb = 0.1" in message
    worst = message.split("Worst tensors")[1].splitlines()[1]
    assert worst.startswith("  tok_emb.weight: relative RMSE") and "int5" in worst
    assert "clip 20.0 sigma" in worst
    assert "far too wide for int5" in message and "floor-division value dedup" in message


def test_pr1818_telltales_on_a_gaussian_matrix():
    """The numbers of seed-techniques A9: int5 at 20 sigma has a 1.33 sigma step; the floor
    dedup adds a mean error of about -0.5 step and leaves few levels."""
    torch.manual_seed(0)
    W = torch.randn(256, 128)
    codes, scales = GPTQConfig().quantize(W, torch.eye(128), 5, 20.0)
    clean = tensor_damage("w", W, Quantized(codes, scales, 5), codes.float() * scales[:, None])
    deduped = codes // 2 * 2
    seed = tensor_damage("w", W, Quantized(deduped, scales, 5),
                         deduped.float() * scales[:, None].float())
    assert clean["step_sigma"] == pytest.approx(20 / 15, rel=0.05)
    assert clean["clip_sigma"] == pytest.approx(20, rel=0.05)
    assert abs(clean["mean_error_steps"]) < 0.05 and seed["mean_error_steps"] < -0.3
    assert seed["rel_rmse"] > 2 * clean["rel_rmse"] and seed["levels"] < clean["levels"]
    assert "biased" in diagnosis(seed) and "biased" not in diagnosis(clean)


def test_guard_verdicts():
    cfg = GuardConfig(max_dbpb=0.1, margin_nats=0.5)
    pre = {"bpb": 1.0, "loss": 3.0}
    verdict = check_damage_gap("a.pgz", {"bpb": 1.05, "loss": 3.1}, pre, vocab_size=1024,
                               cfg=cfg, damage=lambda: pytest.fail("computed on success"))
    assert verdict["passed"] and verdict["dbpb"] == pytest.approx(0.05)
    rows = [{"tensor": "x", "rel_rmse": 0.1}, {"tensor": "tok_emb.weight", "rel_rmse": 0.9}]
    with pytest.raises(ValueError, match=r"near-uniform") as err:
        check_damage_gap("a.pgz", {"bpb": 1.08, "loss": 6.5}, pre, vocab_size=1024, cfg=cfg,
                         damage=lambda: rows)
    assert "within 0.5 of ln(1024) = 6.931" in str(err.value)
    assert str(err.value).index("tok_emb.weight") < str(err.value).index("  x:")
    # a float model that is itself near-uniform (untrained) is no damage gap
    untrained = {"bpb": 3.0, "loss": 6.8}
    assert check_damage_gap("a.pgz", {"bpb": 3.05, "loss": 6.85}, untrained, vocab_size=1024,
                            cfg=cfg, damage=lambda: rows)["passed"]
    with pytest.raises(ValueError, match=r"\+0.2000 over prequant"):
        check_damage_gap("a.pgz", {"bpb": 1.2, "loss": 3.3}, pre, vocab_size=1024, cfg=cfg,
                         damage=lambda: rows)


def test_two_gloo_processes_match_one(setup, tmp_path):
    root, _ = setup
    results = {}
    for mode in ("sliding", "ttt", "phased_ttt"):
        for nproc in (1, 2):
            out = tmp_path / f"{mode}{nproc}.json"
            done = run_eval(setup, mode, out, nproc=nproc, artifact=root / "default.pgz")
            assert done.returncode == 0, done.stdout + done.stderr
            results[mode, nproc] = read_json(out)
    for mode in ("sliding", "ttt", "phased_ttt"):
        one, two = results[mode, 1], results[mode, 2]
        assert two["world_size"] == 2 and (one["tokens"], one["bytes"]) == (two["tokens"],
                                                                          two["bytes"])
        assert one["chunks"]["tokens"] == two["chunks"]["tokens"]
    assert results["sliding", 2]["bpb"] == pytest.approx(results["sliding", 1]["bpb"], rel=1e-9)
    # the summed gradient differs only in float32 summation order
    assert results["ttt", 2]["bpb"] == pytest.approx(results["ttt", 1]["bpb"], rel=1e-5)
    assert results["ttt", 1]["bpb"] < results["sliding", 1]["bpb"]
    assert results["ttt", 1]["lr_schedule"][0] == SPEC["ttt"]["lr"]
    assert results["phased_ttt", 2]["bpb"] == pytest.approx(results["phased_ttt", 1]["bpb"],
                                                            rel=1e-9)  # one batch: rank 0's
    assert results["phased_ttt", 1]["lora_ttt"]["rank"] == SPEC["lora_ttt"]["rank"]
    # one sequence a step: rank 0 has none in every step and still joins the all-reduce
    single = {**SPEC, "ttt": {**SPEC["ttt"], "batch_seqs": 1}}
    for nproc in (1, 2):
        out = tmp_path / f"single{nproc}.json"
        done = run_eval(setup, "ttt", out, nproc=nproc, spec=single, artifact=root / "default.pgz")
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = (read_json(tmp_path / f"single{n}.json")["bpb"] for n in (1, 2))
    assert two == pytest.approx(one, rel=1e-5)


def test_errors_name_the_file(setup, tmp_path):
    root, _ = setup
    broken = tmp_path / "broken.pgz"
    broken.write_bytes((root / "default.pgz").read_bytes()[:-50])
    done = run_eval(setup, "sliding", tmp_path / "x.json", artifact=broken)
    assert done.returncode == 1 and str(broken) in done.stderr
    assert not (tmp_path / "x.json").exists()
    done = run_eval(setup, "roundtrip", tmp_path / "x.json", artifact=root / "default.pgz")
    assert done.returncode == 2 and "--mode roundtrip needs --artifact and --prequant" in \
        done.stderr
    spec = {**SPEC, "eval": {**SPEC["eval"], "max_tokens": 16}}
    done = run_eval(setup, "sliding", tmp_path / "x.json", spec=spec,
                    artifact=root / "default.pgz")
    assert done.returncode == 1 and "eval.max_tokens = 16" in done.stderr
