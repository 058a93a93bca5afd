"""Sliding-window scoring: every target once, stride = seq_len is roundtrip, context is used."""

import numpy as np
import pytest
import torch

from pgolf.data.bytecount import ByteLUT
from pgolf.eval.bpb import evaluate
from pgolf.eval.sliding import plan, sliding_bpb
from pgolf.model.gpt import GPT, GPTConfig


@pytest.mark.parametrize("seed", range(30))
def test_every_target_is_scored_exactly_once(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, 40))
    stride = int(rng.integers(1, seq_len + 1))
    targets = seq_len * int(rng.integers(1, 12))
    rows = plan(targets, seq_len, stride)
    counts = np.zeros(targets, dtype=int)
    for start, first, end in rows:
        assert start <= first < end <= start + seq_len
        counts[first:end] += 1
        if start > 0:  # every later window scores at most `stride`, after seq_len - stride context
            assert end - first <= stride and first - start == seq_len - stride
    assert (counts == 1).all()
    assert rows[0, 0] == 0 and rows[0, 1] == 0


def test_bad_stride():
    with pytest.raises(ValueError, match="stride = 0"):
        plan(100, 10, 0)
    with pytest.raises(ValueError, match="stride = 11"):
        plan(100, 10, 11)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2,
                          num_kv_heads=1)).eval()
    with torch.no_grad():  # zero-initialised projections would make the model ignore context
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.1)
    rng = np.random.default_rng(0)
    lut = ByteLUT(rng.integers(0, 4, 64), rng.random(64) < 0.5, np.arange(64) < 2)
    return model, rng.integers(0, 64, 16 * 12 + 5), lut


def test_stride_equal_to_seq_len_is_roundtrip(tiny):
    model, stream, lut = tiny
    common = dict(seq_len=16, batch_seqs=5, device=torch.device("cpu"))
    plain = evaluate(model, stream, lut, **common)
    slid = sliding_bpb(model, stream, lut, stride=16, **common)
    assert slid["tokens"] == plain["tokens"] == 16 * 12 and slid["bytes"] == plain["bytes"]
    assert slid["bpb"] == pytest.approx(plain["bpb"], rel=1e-12)


def test_short_stride_scores_the_same_targets_with_more_context(tiny):
    model, stream, lut = tiny
    common = dict(seq_len=16, batch_seqs=7, device=torch.device("cpu"))
    plain = evaluate(model, stream, lut, **common)
    slid = sliding_bpb(model, stream, lut, stride=4, **common)
    assert (slid["tokens"], slid["bytes"]) == (plain["tokens"], plain["bytes"])
    assert slid["bpb"] != pytest.approx(plain["bpb"], rel=1e-9)  # context changed the scores
    # batching and padding do not change a result
    again = sliding_bpb(model, stream, lut, stride=4, seq_len=16, batch_seqs=1,
                        device=torch.device("cpu"))
    assert again["bpb"] == pytest.approx(slid["bpb"], rel=1e-12)
