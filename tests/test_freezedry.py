"""Freeze-dry: exact round trips, rebuilds from neighbours, and drops only where it pays.

Also guards the seed version's bugs: zeroing instead of rebuilding, an absolute threshold, and
dropping a column whose neighbour is itself dropped.
"""

import math

import pytest
import torch
from conftest import check_refuses_damage
from test_gptq import calibration

from pgolf.quant import freezedry as fd
from pgolf.quant.gptq import gptq, prepare, sdclip_scales, weighted_error

BITS, CLIP = 6, 12.85


def redundant(seed: int, rows: int = 96, cols: int = 64):
    """Correlated calibration, where every other candidate column is an exact linear combination
    a W[:, j-1] + b W[:, j+1] of its neighbours; returns W, H and those columns."""
    W, H = calibration(rows, cols, seed)
    g = torch.Generator().manual_seed(seed)
    cols_exact = fd.candidate_columns(cols)[::2]
    ab = torch.rand(len(cols_exact), 2, generator=g) * 1.2 - 0.6
    W[:, cols_exact] = ab[:, 0] * W[:, cols_exact - 1] + ab[:, 1] * W[:, cols_exact + 1]
    return W, H, cols_exact


def forced(W, H):
    return fd.encode(W, H, bits=BITS, clip_sigmas=CLIP, cfg=fd.FreezeDryConfig(force=True))


@pytest.fixture(scope="module")
def dried():
    W, H, cols_exact = redundant(seed=0)
    return W, H, cols_exact, fd.encode(W, H, bits=BITS, clip_sigmas=CLIP)


def assert_same(a: fd.FreezeDried, b: fd.FreezeDried):
    assert (a.bits, a.applied) == (b.bits, b.applied)
    for name in ("codes", "scales", "dropped", "coef"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_round_trip_is_exact(dried):
    rep = dried[3]
    plain = fd.encode(*calibration(40, 24, seed=3), bits=BITS, clip_sigmas=CLIP)
    for r in (rep, plain):
        blob = fd.pack(r)
        back = fd.unpack(blob)
        assert_same(back, r)
        assert fd.pack(back) == blob
        assert torch.equal(fd.dequantize(back), fd.dequantize(r))


def test_dequantize_matches_what_the_encoder_assumed(dried):
    W, H = dried[:2]
    scale = sdclip_scales(W, bits=BITS, clip_sigmas=CLIP)
    rep, assumed = fd.freeze_dry_sweep(*prepare(W, H), scale, bits=BITS,
                                       cfg=fd.FreezeDryConfig())
    assert rep.dropped.any()
    assert torch.equal(fd.dequantize(fd.unpack(fd.pack(rep))), assumed)  # bit for bit


def test_drops_only_an_independent_set_and_rebuilds_from_neighbours(dried):
    rep = dried[3]
    cols = rep.codes.size(1)
    by_column = rep.dropped.any(dim=0)
    assert not (by_column[1:] & by_column[:-1]).any()  # never two adjacent columns
    assert set(by_column.nonzero()[:, 0].tolist()) <= set(fd.candidate_columns(cols).tolist())
    W = fd.dequantize(rep)
    rows, cols_ = rep.dropped.nonzero(as_tuple=True)
    a, b = rep.coef[cols_, 0].float(), rep.coef[cols_, 1].float()
    assert torch.equal(W[rows, cols_], a * W[rows, cols_ - 1] + b * W[rows, cols_ + 1])
    assert (W[rows, cols_] != 0).float().mean() > 0.9  # the seed code zeroed them instead
    assert (rep.codes[rep.dropped] == 0).all()


def test_exact_combinations_are_dropped_and_bytes_shrink(dried):
    W, H, cols_exact, rep = dried
    g = fd.FreezeDryConfig().gptq
    codes, scales = gptq(W, H, bits=BITS, clip_sigmas=CLIP, block_size=g.block_size)
    plain = fd._plain(codes, scales, BITS)
    assert rep.applied
    assert rep.dropped[:, cols_exact].float().mean() > 0.6
    assert len(fd.pack(rep)) < 0.97 * len(fd.pack(plain))
    # Dropped elements are within half a step of their prediction, like rounding: no more damage.
    assert weighted_error(W, fd.dequantize(rep), H) < 1.1 * weighted_error(
        W, fd.dequantize(plain), H)


@pytest.mark.parametrize("seed", [1, 2])
def test_declines_on_gaussian_weights(seed):
    W, H = calibration(96, 64, seed)
    rep = fd.encode(W, H, bits=BITS, clip_sigmas=CLIP)
    codes, scales = gptq(W, H, bits=BITS, clip_sigmas=CLIP)
    assert not rep.applied and not rep.dropped.any()
    assert torch.equal(rep.codes, codes) and torch.equal(rep.scales, scales)
    assert len(fd.pack(forced(W, H))) >= len(fd.pack(rep))  # no size gain to be had


def test_column_gate_refuses_drops_that_cost_more_than_they_save():
    W, H = calibration(96, 64, seed=1)
    ungated = fd.encode(W, H, bits=BITS, clip_sigmas=CLIP,
                        cfg=fd.FreezeDryConfig(force=True, column_gate=False))
    # Without the gate, near-zero weights "match" a near-zero prediction and are dropped, which
    # costs more mask bits than the cheap zero codes it saves.
    assert ungated.dropped_fraction > 0.03
    assert len(fd.pack(ungated)) > len(fd.pack(forced(W, H)))


def test_threshold_is_relative_to_the_row_step():
    W, H, _ = redundant(seed=4, rows=48, cols=32)
    small, large = forced(W, H), forced(W * 64, H)  # a power of two: every step scales exactly
    assert small.dropped.any()
    assert torch.equal(small.dropped, large.dropped) and torch.equal(small.codes, large.codes)


def test_mask_costs_about_its_entropy():
    W, H, _ = redundant(seed=5, rows=256, cols=64)
    rep = forced(W, H)
    cand = fd.candidate_columns(64)
    modes = fd.column_modes(rep.dropped[:, cand])
    mixed = rep.dropped[:, cand[modes == fd.MIXED]]
    p = float(mixed.float().mean())
    bound = mixed.numel() * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8
    mask_bytes = len(fd.rans_pack(mixed.numpy().astype("int64"), 2))
    assert mask_bytes < bound + 64  # the table and lane states, not 1 byte per element


def test_unpack_rejects_truncated_and_corrupt_blobs(dried):
    check_refuses_damage(fd.pack(dried[3]), fd.unpack)


def test_user_mistakes_raise_value_error():
    W, H = calibration(8, 12, seed=0)
    with pytest.raises(ValueError, match="Hessian shape"):
        fd.encode(W, H[:5, :5], bits=BITS, clip_sigmas=CLIP)
    with pytest.raises(ValueError, match="bits"):
        fd.encode(W, H, bits=9, clip_sigmas=CLIP)
    with pytest.raises(ValueError, match="threshold"):
        fd.FreezeDryConfig(threshold=-1)
    assert not fd.FreezeDryConfig().enabled  # off by default
