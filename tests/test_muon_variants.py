"""Polar-Express Newton-Schulz, per-iteration coefficients and sharded (parallel) Muon."""

import numpy as np
import pytest
import torch

from pgolf.train.muon import NS_COEFFS, POLAR_EXPRESS_COEFFS, Muon, newton_schulz
from pgolf.train.trainer import OptimConfig, TrainConfig


def spread_matrix(shape, seed):
    """A random matrix whose singular values span 100x (as momentum updates do)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    return U[:, :k] @ torch.diag(torch.logspace(-2, 0, k)) @ V[:, :k].T


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96)])
def test_polar_express_brings_singular_values_closer_to_one(shape):
    errors = {}
    for name, coeffs in (("standard", NS_COEFFS), ("polar", POLAR_EXPRESS_COEFFS)):
        s = torch.cat([torch.linalg.svdvals(newton_schulz(spread_matrix(shape, seed), steps=5,
                                                          coeffs=coeffs)) for seed in range(3)])
        errors[name] = ((s - 1).abs().mean().item(), (s - 1).abs().max().item())
    # Measured: standard NS5 mean |s - 1| ~0.17, max ~0.32; Polar Express ~0.08 and ~0.14.
    assert errors["polar"][0] < 0.5 * errors["standard"][0], errors
    assert errors["polar"][1] < 0.2 < errors["standard"][1], errors


def test_polar_express_table_is_the_minimax_composition():
    # The scalar map x -> a x + b x^3 + c x^5, composed over the five triples, takes every
    # normalised singular value in [1e-3, 1] to within 0.142 of 1 (a typo in the table breaks
    # this); the single standard triple repeated five times stays 0.53 away at worst.
    def composed(triples, x):
        for a, b, c in triples:
            x = a * x + b * x**3 + c * x**5
        return x

    x = np.logspace(-3, 0, 1000)
    assert np.abs(composed(POLAR_EXPRESS_COEFFS, x) - 1).max() < 0.145
    assert np.abs(composed([NS_COEFFS] * 5, x) - 1).max() > 0.5


def test_a_list_of_identical_triples_is_the_single_triple_path():
    G = torch.randn(48, 24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(newton_schulz(G, steps=4, coeffs=[NS_COEFFS] * 4),
                       newton_schulz(G, steps=4, coeffs=NS_COEFFS))
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    single = Muon(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    listed = Muon(copies, lr=0.1, momentum=0.9, weight_decay=0.1, ns_coeffs=[NS_COEFFS] * 5)
    for step in range(3):
        for p, q in zip(params, copies, strict=True):
            p.grad = q.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        single.step()
        listed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies, strict=True))


def test_each_iteration_uses_its_own_triple():
    G = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    triples = [(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)]
    X = G / (G.norm() + 1e-7)
    for a, b, c in triples:  # the quintic iteration by hand
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    assert torch.allclose(newton_schulz(G, steps=2, coeffs=triples), X, atol=1e-6)
    assert not torch.allclose(newton_schulz(G, steps=2, coeffs=triples[::-1]), X, atol=1e-3)


def test_single_process_sharded_step_is_the_round_robin_step():
    shapes = [(16, 8), (16, 8), (8, 16), (16, 8), (12, 12)]  # banks of 3, 1 and 1 matrices
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(*s, generator=gen) for s in shapes]
    runs = {}
    for sharding in ("round_robin", "sharded"):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = Muon(params, lr=0.05, momentum=0.9, row_normalize=True, weight_decay=0.2,
                   ns_coeffs=POLAR_EXPRESS_COEFFS, sharding=sharding)
        for step in range(3):
            g = torch.Generator().manual_seed(10 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[sharding] = params
    for p, q in zip(runs["round_robin"], runs["sharded"], strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert not torch.allclose(runs["sharded"][0], base[0], atol=1e-3)


@pytest.mark.parametrize(("values", "message"), [
    ({"ns_method": "cubic"}, "train.optim.ns_method = 'cubic': standard or polar_express"),
    ({"muon_sharding": "zero3"}, "train.optim.muon_sharding = 'zero3': one of"),
    ({"ns_method": "polar_express", "ns_steps": 6}, r"train.optim.ns_steps = 6: polar_express"),
    ({"ns_method": "polar_express", "ns_coeffs": [3.0, -4.0, 2.0]},
     r"train.optim.ns_coeffs = \[3.0, -4.0, 2.0\]: set by ns_method"),
    ({"ns_coeffs": [[3.0, -4.0, 2.0]] * 4}, r"train.optim.ns_coeffs = .*: need one \(a, b, c\) "
     r"or 5 of them"),
    ({"ns_coeffs": [3.0, -4.0]}, r"train.optim.ns_coeffs = \[3.0, -4.0\]"),
])
def test_bad_optimizer_settings_name_their_key(values, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**values)


def test_polar_express_config_gives_the_record_table():
    assert OptimConfig(ns_method="polar_express").ns_schedule == list(POLAR_EXPRESS_COEFFS)
    assert OptimConfig(ns_method="polar_express", ns_steps=3).ns_schedule == list(
        POLAR_EXPRESS_COEFFS[:3])
    assert OptimConfig().ns_schedule == [NS_COEFFS] * 5


def test_local_clip_needs_sharded_muon():
    with pytest.raises(ValueError, match="train.grad_clip_local = True needs "
                                         "train.optim.muon_sharding = 'sharded'"):
        TrainConfig(grad_clip=0.3, grad_clip_local=True)
    TrainConfig(grad_clip=0.3, grad_clip_local=True, optim={"muon_sharding": "sharded"})


def train_weights(*, sharding: str, grad_clip: float) -> dict:
    from pgolf.data.loader import ShuffledStream, stream_rng
    from pgolf.model.gpt import GPTConfig
    from pgolf.train.distributed import Dist
    from pgolf.train.trainer import build_run, train_loop

    tokens = {"a": np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)}
    stream = ShuffledStream(tokens, seq_len=16, rng=stream_rng(5, 0))
    cfg = TrainConfig(seq_len=16, batch_tokens=64, steps=4, device="cpu", ema_decay=0,
                      grad_clip=grad_clip, loader={"sampler": "shuffled", "streams": 1},
                      optim={"muon_sharding": sharding, "ns_method": "polar_express",
                             "row_normalize": True, "muon_wd": 0.1})
    model_cfg = GPTConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2,
                          num_kv_heads=1, loop_start=0, loop_end=0, num_loops=1)
    run = build_run(model_cfg, cfg, dist=Dist(0, 1, 0, torch.device("cpu")), streams=[stream],
                    seed=3)
    train_loop(run)
    return run.model.state_dict()


def test_single_process_sharded_training_is_round_robin_training():
    # Without a clip nothing differs but the batching of Newton-Schulz: bit-identical on the CPU.
    plain, sharded = (train_weights(sharding=s, grad_clip=0.0) for s in ("round_robin", "sharded"))
    assert all(torch.equal(plain[k], sharded[k]) for k in plain)
    # A binding clip (gradient norm ~0.7): the sharded path computes the same global norm itself.
    plain, sharded = (train_weights(sharding=s, grad_clip=0.1) for s in ("round_robin", "sharded"))
    assert all(torch.allclose(plain[k], sharded[k], atol=1e-5, rtol=0) for k in plain)
    loose = train_weights(sharding="sharded", grad_clip=0.0)
    assert max(float((loose[k] - sharded[k]).abs().max()) for k in plain) > 1e-3
