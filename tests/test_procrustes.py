"""Procrustes: the right rotation, its transposed-R bug, and the null it must be read against."""

import pytest
import torch

from pgolf.analysis.procrustes import against_null, reduction, rotation


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
