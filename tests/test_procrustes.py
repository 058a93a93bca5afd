"""Procrustes: the right rotation, its transposed-R bug, and the null it must be read against."""

import math

import pytest
import torch

from pgolf.analysis.procrustes import (
    ProcrustesConfig,
    against_null,
    layer_table,
    reduction,
    rotation,
    seed_table,
)
from pgolf.model.gpt import GPT, GPTConfig


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return Q


def test_an_exact_rotation_is_found():
    A = torch.randn(96, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = random_orthogonal(32, 1)
    assert torch.allclose(rotation(A, A @ Q), Q, atol=1e-10)
    assert reduction(A, A @ Q) == pytest.approx(1.0, abs=1e-12)  # 100% reduction
    result = against_null(A, A @ Q)
    assert result["reduction"] == pytest.approx(1.0) and result["z"] > 10


def test_the_transposed_rotation_of_pr1048_finds_almost_nothing():
    A = torch.randn(96, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    B = A @ random_orthogonal(32, 3)
    R = rotation(A, B)
    assert reduction(A, B, R.T) < 0.2 < 0.99 < reduction(A, B, R)  # V U^T instead of U V^T


def test_random_weights_are_indistinguishable_from_the_null():
    g = torch.Generator().manual_seed(4)
    zs = []
    for _ in range(5):
        A, B = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)
        result = against_null(A, B, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        assert 0.3 < result["reduction"] < 0.7  # a large reduction: degrees of freedom only
        zs.append(result["z"])
    assert max(abs(z) for z in zs) < 3.5


def test_the_null_reproduces_the_reference_numbers():
    # seed-techniques B1: i.i.d. Gaussian pairs reduce the MSE by ~91.7% at 512 x 1536 (R has
    # 1536^2 parameters) and ~47.2% at 1536 x 512, the numbers PR #1048 reported as structure
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(512, 1536, generator=g), torch.randn(512, 1536, generator=g)
    assert reduction(A, B) == pytest.approx(0.917, abs=0.01)
    assert reduction(A.T, B.T) == pytest.approx(0.472, abs=0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        against_null(torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 20"):
        against_null(torch.ones(4, 3), torch.ones(4, 3), pairs=5)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
def test_the_singular_value_shortcut_equals_the_explicit_rotation(shape):
    g = torch.Generator().manual_seed(6)
    A, B = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    assert reduction(A, B) == pytest.approx(reduction(A, B, rotation(A, B)), abs=1e-12)


def test_tables_pair_layers_of_one_type_and_seeds_of_one_matrix():
    g = torch.Generator().manual_seed(7)
    names = [f"blocks.{i}.mlp.fc.weight" for i in range(3)] + ["tok_emb.weight"]
    state = {n: torch.randn(24, 8, generator=g) for n in names}
    every = layer_table(state, names, cfg=ProcrustesConfig())
    assert [(r["a"][7], r["b"][7]) for r in every] == [("0", "1"), ("0", "2"), ("1", "2")]
    assert {r["type"] for r in every} == {"mlp.fc"}  # the embedding has no layer partner
    adjacent = layer_table(state, names, cfg=ProcrustesConfig(layer_pairs="adjacent"))
    assert len(adjacent) == 2
    other = {n: torch.randn(24, 8, generator=g) for n in names}
    rows = seed_table({1: state, 2: other, 3: state}, names, cfg=ProcrustesConfig())
    assert len(rows) == 3 * len(names)  # 3 seed pairs
    same = [r for r in rows if (r["seed_a"], r["seed_b"]) == (1, 3)]
    assert all(math.isnan(r["reduction"]) for r in same)  # identical: nothing to reduce
    assert not any(math.isnan(r["reduction"]) for r in rows if r not in same)
    with pytest.raises(ValueError, match="adjacent"):
        ProcrustesConfig(layer_pairs="nearby")


def test_orthogonally_initialised_square_matrices_start_as_exact_rotations():
    # why init_reduction is reported: before any training, c_q of two layers (orthogonal init,
    # square) are related by a rotation exactly, far above the random null
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1)
    state = GPT(cfg).state_dict()
    names = [f"blocks.{i}.attn.c_q.weight" for i in range(3)]
    rows = layer_table(state, names, cfg=ProcrustesConfig(), init=state)
    for row in rows:
        assert row["reduction"] == pytest.approx(1.0) == row["init_reduction"]
        assert row["z"] > 10
