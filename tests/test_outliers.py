"""Outlier statistics: zero on the null, found where planted, always beside the Gaussian null."""

import pytest
import torch

from pgolf.analysis.outliers import gaussian_null, outlier_table, statistics


def test_a_gaussian_matrix_sits_at_its_null():
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    stats, null = statistics(W), gaussian_null((256, 128), draws=8, seed=2)
    for key in ("excess_kurtosis", "outlier_elements", "max_over_sd"):
        assert abs(stats[key] - null[f"{key}_null"]) < 4 * null[f"{key}_null_sd"] + 1e-3
    assert abs(stats["excess_kurtosis"]) < 0.1  # 0 for a Gaussian


def test_planted_outliers_are_found():
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(3))
    W[7] *= 6  # an outlier row
    W[:, 11] *= 6  # an outlier column
    stats = statistics(W)
    null = gaussian_null((256, 128))
    assert stats["outlier_rows"] >= 1 and stats["outlier_cols"] >= 1
    assert stats["excess_kurtosis"] > 10 * max(null["excess_kurtosis_null_sd"], 0.01)
    heavy = statistics(torch.distributions.StudentT(3.0).sample((256, 128)))
    assert heavy["excess_kurtosis"] > 1.0 and heavy["outlier_elements"] > null[
        "outlier_elements_null"]


def test_the_table_pairs_each_tensor_with_its_shape_null():
    g = torch.Generator().manual_seed(4)
    state = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(32, 64, generator=g)}
    rows = outlier_table(state, ["a", "b"], draws=4)
    assert [(r["tensor"], r["rows"], r["cols"]) for r in rows] == [("a", 64, 32), ("b", 32, 64)]
    assert all("excess_kurtosis_null" in r and r["outlier_rows_null_sd"] >= 0 for r in rows)
    assert rows[0]["max_over_sd_null"] == pytest.approx(
        gaussian_null((64, 32), draws=4)["max_over_sd_null"])
