"""2:4 sparsity: exact round trips, 2 of every 4 kept, and less error than magnitude pruning.

Also guards the seed version's flaws: an unpacked byte per pair index, and a mid-rise grid with
no zero level.
"""

import math

import pytest
import torch
from conftest import check_refuses_damage
from test_gptq import calibration

from pgolf.quant import sparse24 as sp
from pgolf.quant.gptq import qmax, sdclip_scales, weighted_error

BITS, CLIP = 6, 12.85


@pytest.fixture(scope="module")
def sparse():
    W, H = calibration(96, 64, seed=0)
    return W, H, sp.encode(W, H, bits=BITS, clip_sigmas=CLIP)


def test_round_trip_is_exact(sparse):
    rep = sparse[2]
    blob = sp.pack(rep)
    back = sp.unpack(blob)
    for name in ("pairs", "codes", "scales"):
        assert torch.equal(getattr(back, name), getattr(rep, name)), name
    assert back.bits == rep.bits and sp.pack(back) == blob
    assert torch.equal(sp.dequantize(back), sp.dequantize(rep))


def test_dequantize_matches_what_the_encoder_assumed(sparse):
    W, H, _ = sparse
    scale = sdclip_scales(W, bits=BITS, clip_sigmas=CLIP)
    W, H = sp.prepare(W, H)
    rep, assumed = sp.sparse_sweep(W, H, scale, bits=BITS, cfg=sp.Sparse24Config())
    assert torch.equal(sp.dequantize(sp.unpack(sp.pack(rep))), assumed)  # bit for bit


def test_keeps_exactly_two_of_every_four(sparse):
    rep = sparse[2]
    rows, cols = rep.shape
    W = sp.dequantize(rep).view(rows, cols // 4, 4)
    kept = torch.zeros_like(W, dtype=torch.bool).scatter_(2, sp.PAIRS[rep.pairs.long()], True)
    assert (kept.sum(dim=2) == 2).all()
    assert (W[~kept] == 0).all() and (W != 0).sum(dim=2).max() <= 2
    assert rep.codes.numel() == rows * cols // 2  # only the kept half is stored


def test_pair_index_costs_at_most_log2_6_bits_a_block(sparse):
    rep = sparse[2]
    blocks = rep.pairs.numel()
    _, sections = sp.unframe(sp.pack(rep), sp.MAGIC, sp.HEAD)
    codec, blob = sections[1]  # the pair-index section as stored
    assert codec == "rans"
    overhead = 12 + 2 * len(sp.PAIRS) + 4 * 4  # header, frequency table, a few lane states
    assert len(blob) <= blocks * math.log2(6) / 8 + overhead
    assert len(blob) < 0.4 * blocks  # the seed code spent a whole byte per block


def test_grid_is_symmetric_with_a_zero_level():
    W, H = calibration(16, 32, seed=1)
    W[0, :4] = torch.tensor([1e-5, -2e-5, 3e-5, 0.0])  # a block far below its row's step
    rep = sp.encode(W, H, bits=BITS, clip_sigmas=CLIP)
    deq = sp.dequantize(rep)
    assert (deq[0, :4] == 0).all()  # the seed's mid-rise grid had no zero: +-0.5 step at best
    steps = deq / rep.scales.float()[:, None]
    assert torch.equal(steps, steps.round()) and steps.abs().max() <= qmax(BITS)
    mirrored = sp.encode(-W, H, bits=BITS, clip_sigmas=CLIP)
    assert torch.equal(mirrored.codes, -rep.codes) and torch.equal(mirrored.pairs, rep.pairs)


@pytest.mark.parametrize("saliency", sp.SALIENCY)
@pytest.mark.parametrize("seed", [2, 3])
def test_beats_magnitude_prune_then_round(saliency, seed):
    W, H = calibration(64, 96, seed)
    cfg = sp.Sparse24Config(saliency=saliency)
    scale = sdclip_scales(W, bits=4, clip_sigmas=6.5)
    swept, _ = sp.sparse_sweep(*sp.prepare(W, H), scale, bits=4, cfg=cfg)
    naive = sp.magnitude_prune(W, scale, bits=4)
    # The kernel itself, not encode's fallback, must beat the naive baseline clearly.
    assert weighted_error(W, sp.dequantize(swept), H) < 0.85 * weighted_error(
        W, sp.dequantize(naive), H)


def test_unpack_rejects_truncated_and_corrupt_blobs(sparse):
    check_refuses_damage(sp.pack(sparse[2]), sp.unpack)


def test_user_mistakes_raise_value_error():
    W, H = calibration(8, 10, seed=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sp.encode(W, H, bits=BITS, clip_sigmas=CLIP)
    with pytest.raises(ValueError, match="saliency"):
        sp.Sparse24Config(saliency="random")
    with pytest.raises(ValueError, match="block_size"):
        sp.Sparse24Config(block_size=30)
    assert not sp.Sparse24Config().enabled  # off by default
