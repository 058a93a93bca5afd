"""The GPTQ kernel against a plain reference, against round-to-nearest, and the seed PRs' bugs."""

import pytest
import torch

from pgolf.quant.gptq import (
    GPTQConfig,
    dequantize,
    gptq,
    qmax,
    round_to_nearest,
    sdclip_scales,
    weighted_error,
)


def calibration(rows: int, cols: int, seed: int, dead: int = 0):
    """W and H = X^T X from correlated inputs, as a layer sees them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(4 * cols, cols, generator=g) @ mix
    X[:, :dead] = 0  # columns whose input is always zero
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, X.T @ X / len(X)


def reference_gptq(W, H, *, bits, clip_sigmas, damp=0.01):
    """Column by column in act order, H^-1 updated by Gaussian elimination; no blocks, no
    Cholesky. Written from the paper's equations, independently of the kernel."""
    W, H = W.double().clone(), H.double().clone()
    scale = sdclip_scales(W.float(), bits=bits, clip_sigmas=clip_sigmas).double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True)
    Hinv, q, Q = torch.linalg.inv(H), qmax(bits), torch.zeros_like(W)
    for j in order.tolist():
        Q[:, j] = torch.clamp(torch.round(W[:, j] / scale), -q, q)
        err = (W[:, j] - Q[:, j] * scale) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]  # column j itself becomes its quantized value
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]  # eliminate j
    return Q.to(torch.int8), scale.to(torch.float16)


@pytest.mark.parametrize("rows,cols,bits", [(48, 64, 4), (32, 96, 6)])
def test_matches_the_column_by_column_reference(rows, cols, bits):
    W, H = calibration(rows, cols, seed=bits)
    codes, scale = gptq(W, H, bits=bits, clip_sigmas=8.0, block_size=16)
    ref_codes, ref_scale = reference_gptq(W, H, bits=bits, clip_sigmas=8.0)
    assert torch.equal(scale, ref_scale)
    assert (codes == ref_codes).float().mean() > 0.99  # rare ties may round the other way
    ours = weighted_error(W, dequantize(codes, scale), H)
    theirs = weighted_error(W, dequantize(ref_codes, ref_scale), H)
    assert ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize("seed", range(12))
def test_never_worse_than_round_to_nearest(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = (int(x) for x in torch.randint(8, 80, (2,), generator=g))
    bits = int(torch.randint(2, 9, (1,), generator=g))
    W, H = calibration(rows, cols, seed, dead=seed % 3)
    clip = float(torch.empty(1).uniform_(2.0, 20.0, generator=g))
    codes, scale = gptq(W, H, bits=bits, clip_sigmas=clip, block_size=int(8 + seed))
    rtn = round_to_nearest(W * (torch.diag(H) != 0), scale, bits=bits)
    # Strictly better, not merely equal: a kernel that always fell back to RTN would fail here.
    assert weighted_error(W, dequantize(codes, scale), H) <= 0.95 * weighted_error(
        W, dequantize(rtn, scale), H)
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax(bits)
    assert scale.dtype == torch.float16


def test_gptq_beats_rtn_clearly_on_correlated_inputs():
    W, H = calibration(64, 128, seed=7)
    codes, scale = gptq(W, H, bits=4, clip_sigmas=6.0)
    rtn = round_to_nearest(W, scale, bits=4)
    assert weighted_error(W, dequantize(codes, scale), H) < 0.8 * weighted_error(
        W, dequantize(rtn, scale), H)


def test_no_scale_floor_seed_bug_b6():
    # Trained weights are small: with the seed's max(clip/31, 1/31) floor, every such row got the
    # step 1/31 and an MSE of (1/31)^2/12 = 8.67e-5 whatever its values.
    W = torch.randn(16, 256) * 0.01
    scale = sdclip_scales(W, bits=6, clip_sigmas=12.85)
    assert torch.allclose(scale.float(), 12.85 * W.std(dim=1) / 31, rtol=1e-3)
    assert (scale.float() < 1 / 31 / 5).all()
    mse = (dequantize(round_to_nearest(W, scale, bits=6), scale) - W).pow(2).mean()
    assert mse < (1 / 31) ** 2 / 12 / 50


def test_no_post_gptq_value_dedup_seed_bug_a4():
    # The seed floor-divided codes to even values after GPTQ (q // 2 * 2): odd codes vanished and
    # every odd code moved down, a bias of about -0.5 step.
    W, H = calibration(64, 64, seed=3)
    codes, scale = gptq(W, H, bits=6, clip_sigmas=12.85)
    assert (codes % 2 != 0).float().mean() > 0.3
    bias = ((dequantize(codes, scale) - W) / scale.float()[:, None]).mean()
    assert abs(float(bias)) < 0.05
    deduped = codes // 2 * 2
    seed_bias = ((dequantize(deduped, scale) - W) / scale.float()[:, None]).mean()
    assert float(seed_bias) < -0.2  # what the bug did, for contrast


def test_clip_follows_the_bit_width_not_the_role_seed_bug_1818():
    # #1818 quantized the tied embedding at int5 with the 20-sigma clip tuned for int8: a step of
    # 20 sigma / 15 wipes out most of the signal. pgolf picks k from the bit width.
    cfg = GPTQConfig()
    W = torch.randn(512, 64)
    H = torch.eye(64)
    rel = {}
    for label, clip in (("pgolf", cfg.clip_sigmas[5]), ("seed", 20.0)):
        codes, scale = gptq(W, H, bits=5, clip_sigmas=clip)
        rel[label] = float((dequantize(codes, scale) - W).norm() / W.norm())
    codes, scale = cfg.quantize(W, H, bits=5)
    assert float((dequantize(codes, scale) - W).norm() / W.norm()) == pytest.approx(rel["pgolf"])
    assert rel["pgolf"] < 0.6 * rel["seed"]


def test_bad_bit_widths():
    with pytest.raises(ValueError, match="2..8 bits"):
        qmax(9)
    with pytest.raises(ValueError, match="no entry for 3 bits"):
        GPTQConfig(clip_sigmas={6: 12.85}).quantize(torch.ones(2, 2), torch.eye(2), bits=3)


def test_clip_search_never_worse_than_the_configured_clip():
    torch.manual_seed(3)
    W = torch.randn(64, 48) * torch.rand(64, 1)
    W[0, 0] = 8.0  # an outlier: the configured k is not the best for this tensor
    X = torch.randn(256, 48)
    H = X.T @ X
    plain = GPTQConfig()
    searched = GPTQConfig(clip_search=[0.5, 0.75, 1.25, 1.5])
    for bits in (3, 4, 6):
        codes, scales, k = plain.search(W, H, bits)
        assert k == plain.clip_sigmas[bits]
        base_error = weighted_error(W, dequantize(codes, scales), H)
        codes, scales, k = searched.search(W, H, bits)
        assert k in [plain.clip_sigmas[bits] * m for m in (1, 0.5, 0.75, 1.25, 1.5)]
        assert weighted_error(W, dequantize(codes, scales), H) <= base_error
    with pytest.raises(ValueError, match="multipliers must be > 0"):
        GPTQConfig(clip_search=[0.0])
