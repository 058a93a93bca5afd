"""Muon, the schedule, EMA, resume state and the data streams."""

import numpy as np
import pytest
import torch

from pgolf.data.loader import CurriculumStream, ShuffledStream, bucket_weights, stream_rng
from pgolf.train.checkpoint import load_state, save_state
from pgolf.train.ema import EMA
from pgolf.train.muon import Muon, newton_schulz
from pgolf.train.schedule import ScheduleConfig, lr_multiplier, muon_momentum


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    # Spread singular values over 10x; five quintic steps cannot lift values far below
    # 1/100 of the largest to ~1 (a known limit of Muon's approximation, not a bug).
    G = torch.randn(*shape) @ torch.diag(torch.logspace(-0.5, 0.5, shape[1]))
    s = torch.linalg.svdvals(newton_schulz(G))
    # A square random matrix has one near-zero singular value of its own; the bulk must be ~1.
    assert ((s > 0.6) & (s < 1.25)).float().mean() >= 0.95 and s.max() < 1.25
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (newton_schulz(G) * (U @ Vh)).sum() / (U @ Vh).norm() ** 2
    assert cos > 0.85  # it approximates U V^T, not just any orthogonal matrix


def test_muon_step_is_scaled_orthogonal_update_with_decoupled_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 32))
    p.grad = torch.randn(128, 32)
    before = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5)
    opt.step()
    update = (before * (1 - 0.1 * 0.5) - p.detach()) / 0.1
    s = torch.linalg.svdvals(update / 2.0)  # sqrt(max(1, 128/32)) = 2
    assert s.min() > 0.6 and s.max() < 1.25


def test_muon_nesterov_and_row_normalisation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = Muon([p], lr=0.0, momentum=0.9, row_normalize=True)
    grads = [torch.randn(16, 16) for _ in range(2)]
    for g in grads:
        p.grad = g
        opt.step()
    assert torch.allclose(opt.state[p]["momentum_buffer"], 0.9 * grads[0] + grads[1])
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(3))], lr=0.1)


def test_lr_schedule():
    cfg = ScheduleConfig(warmup_steps=10, warmdown_frac=0.5, min_lr=0.1)
    assert lr_multiplier(cfg, step=0, frac=0.0) == pytest.approx(0.1)
    assert lr_multiplier(cfg, step=20, frac=0.4) == 1.0
    assert lr_multiplier(cfg, step=20, frac=0.75) == pytest.approx(0.5)
    assert lr_multiplier(cfg, step=20, frac=1.0) == pytest.approx(0.1)
    assert muon_momentum(step=250, start=0.85, end=0.95, warmup_steps=500) == pytest.approx(0.9)


@pytest.mark.parametrize(("frac", "expected"), [
    (0.0, 1.0), (0.15, 1.0), (0.5, 0.5 / 0.85), (0.9, 0.1 / 0.85), (0.915, 0.1), (0.95, 0.1),
    (1.0, 0.1)])
def test_lr_schedule_of_the_sota_record(frac, expected):
    # The record's lr_mul: 1 until 1 - warmdown_frac, then max((1 - frac) / warmdown_frac, min_lr):
    # a floor (0.1 from frac = 0.915 on), not an interpolation towards min_lr.
    cfg = ScheduleConfig(warmdown_frac=0.85, min_lr=0.1)
    assert lr_multiplier(cfg, step=100, frac=frac) == pytest.approx(expected, abs=1e-12)


def test_min_lr_zero_is_the_plain_linear_warmdown_bit_for_bit():
    def before(cfg, step, frac):  # the schedule before min_lr had the record's meaning
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.warmdown_frac > 0 and frac > 1 - cfg.warmdown_frac:
            decay = max(0.0, (1 - frac) / cfg.warmdown_frac)
            return warm * (cfg.min_lr + (1 - cfg.min_lr) * decay)
        return warm

    for cfg in (ScheduleConfig(), ScheduleConfig(warmup_steps=10, warmdown_frac=0.5)):
        for step, frac in zip(range(0, 400, 4), np.linspace(0, 1, 100), strict=True):
            assert lr_multiplier(cfg, step=step, frac=frac) == before(cfg, step, frac)


@pytest.mark.parametrize("min_lr", [-0.1, 1.5])
def test_min_lr_outside_the_unit_interval_is_refused(min_lr):
    with pytest.raises(ValueError, match=rf"train.schedule.min_lr = {min_lr}: must be in"):
        ScheduleConfig(min_lr=min_lr)


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1))
    ema.copy_to(model)
    assert torch.allclose(model.weight, start + 0.1)


def test_resume_state_round_trip(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = {"optim": opt.state_dict(), "step": 7, "rng": stream_rng(1, 0).bit_generator.state}
    save_state(tmp_path, 7, state)
    save_state(tmp_path, 9, {**state, "step": 9})
    loaded = load_state(tmp_path)
    assert loaded["step"] == 9 and len(list(tmp_path.glob("state-*.json"))) == 1
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optim"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]
                       ["exp_avg"])
    assert loaded["rng"] == state["rng"]


def test_bucket_weights_formula():
    w = bucket_weights(5, 0.25, floor=0.02)
    d = np.arange(5) / 4
    raw = np.maximum(0.02, (1 - d) * 0.75 + d * 0.25)
    assert np.allclose(w, raw / raw.sum())
    start, end = bucket_weights(4, 0.0, 0.02), bucket_weights(4, 1.0, 0.02)
    assert start.argmax() == 0 and end.argmax() == 3 and np.isclose(start[3], 0.02 / 2.02)
    assert bucket_weights(3, 0.5, 0.0, present=np.array([True, False, True]))[1] == 0


def curriculum(seed):
    tokens = np.arange(10_000, dtype=np.uint16)
    windows = {"shard": np.array(["a"] * 300), "start": np.arange(300) * 32,
               "bucket": np.repeat(np.arange(3), 100)}
    return CurriculumStream(windows, {"a": tokens}, num_buckets=3, seq_len=32, floor=0.02,
                            rng=stream_rng(seed, 0))


def test_curriculum_draws_follow_the_weights_and_the_seed():
    stream = curriculum(1)
    rows = stream.draw(6000, progress=0.3)
    assert rows.shape == (6000, 33) and (np.diff(rows, axis=1) == 1).all()
    observed = np.bincount(rows[:, 0] // 32 // 100, minlength=3) / 6000
    assert np.allclose(observed, bucket_weights(3, 0.3, 0.02), atol=0.02)
    assert not np.array_equal(curriculum(1).draw(20, 0.3), curriculum(2).draw(20, 0.3))
    assert np.array_equal(curriculum(1).draw(20, 0.3), curriculum(1).draw(20, 0.3))


def test_shuffled_stream_covers_each_window_once_per_epoch_and_resumes():
    tokens = {"a": np.arange(1000, dtype=np.uint16), "b": np.arange(500, dtype=np.uint16)}
    stream = ShuffledStream(tokens, seq_len=10, rng=stream_rng(3, 1))
    total = sum(len(o) for o in stream.order)
    rows = stream.draw(total, 0.0)
    starts = sorted((int(r[0]), len(r)) for r in rows)
    assert len(set(starts)) == total and all(n == 11 for _, n in starts)
    saved = stream.state_dict()
    ahead = stream.draw(7, 0.0)
    stream.load_state_dict(saved)
    assert np.array_equal(stream.draw(7, 0.0), ahead)


def test_compile_warmup_leaves_no_trace():
    from pgolf.model.gpt import GPTConfig
    from pgolf.train.distributed import Dist
    from pgolf.train.main import compile_warmup
    from pgolf.train.trainer import TrainConfig, build_run, train_loop

    def run_once(warmup: int):
        tokens = {"a": np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)}
        stream = ShuffledStream(tokens, seq_len=16, rng=stream_rng(5, 0))
        cfg = TrainConfig(seq_len=16, batch_tokens=64, steps=4, device="cpu", ema_decay=0.5,
                          loader={"sampler": "shuffled", "streams": 1})
        model_cfg = GPTConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2,
                              num_kv_heads=1, loop_start=0, loop_end=0, num_loops=1)
        run = build_run(model_cfg, cfg, dist=Dist(0, 1, 0, torch.device("cpu")),
                        streams=[stream], seed=3)
        compile_warmup(run, warmup)
        train_loop(run)
        return run

    plain, warmed = run_once(0), run_once(3)
    assert warmed.step == plain.step == 4 and len(warmed.metrics) == 4
    assert [m["loss"] for m in warmed.metrics] == [m["loss"] for m in plain.metrics]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, warmed.model.state_dict()[name]), name


def test_manifest_for_another_vocab_or_seq_len_is_refused(tmp_path):
    import pyarrow as pa

    from pgolf.data.loader import check_manifest
    from pgolf.data.scores import write_table

    path = tmp_path / "curriculum.parquet"
    write_table(pa.table({"shard": ["a"], "start": [0], "bucket": [0]}), path,
                {"seq_len": 64, "vocab_size": 1024, "num_buckets": 1})
    assert check_manifest(path, seq_len=64, vocab_size=1024)["num_buckets"] == 1
    with pytest.raises(ValueError, match=r"vocab size 1024 does not match model.vocab_size=8192"):
        check_manifest(path, seq_len=64, vocab_size=8192)
    with pytest.raises(ValueError, match=r"seq_len 64 does not match train.seq_len=128"):
        check_manifest(path, seq_len=128, vocab_size=1024)
