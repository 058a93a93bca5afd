"""Evaluation modes: exact BPB by hand, sliding and TTT equivalences, TTT legality (C1-C4)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pgolf.data.bytecount import ByteLUT
from pgolf.eval.bpb import evaluate
from pgolf.eval.sliding import chunk_rows, plan, score_rows, sliding_bpb
from pgolf.eval.ttt import TTTConfig, lr_schedule, sequence_starts, train_chunk, trainable, ttt_bpb
from pgolf.model.gpt import GPT, GPTConfig

CPU = torch.device("cpu")


class Fixed(nn.Module):
    """A context-free model: the same next-token distribution everywhere."""

    def __init__(self, probs):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(probs, dtype=torch.float64).log())  # exact sums

    def forward(self, idx, targets, reduction="mean"):
        logits = self.bias.expand(*idx.shape, -1)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                           targets.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)


def test_bpb_by_hand_in_every_mode():
    # ids: 0 <pad>, 1 <s> (BOS), 2 "▁the" (3 bytes + space), 3 "re" (2), 4 <0xE2> byte piece (1),
    # 5 "é" (2), 6 beyond the vocabulary (boundary)
    lut = ByteLUT(base_bytes=np.array([0, 0, 3, 2, 1, 2, 0]),
                  has_leading_space=np.array([0, 0, 1, 0, 0, 0, 0], dtype=bool),
                  is_boundary=np.array([1, 1, 0, 0, 0, 0, 1], dtype=bool))
    probs = [1 / 16, 1 / 16, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 4]  # bits: 4 4 2 3 3 3 2
    # <s> ▁the re ▁the <0xE2> é <s> ▁the <pad> ▁the re, three times, then <s>. Targets of one
    # repeat and their bytes: ▁the after BOS 3, re 2, ▁the after re 4 (its space counts), byte 1,
    # é 2, BOS 0, ▁the after BOS 3, <pad> 0, ▁the after a boundary 3, re 2, next BOS 0 = 20 bytes;
    # bits 2+3+2+3+3+4+2+4+2+3+4 = 32. Three repeats: 96 bits over 60 bytes.
    stream = np.array([1, 2, 3, 2, 4, 5, 1, 2, 0, 2, 3] * 3 + [1])
    model = Fixed(probs)
    common = dict(seq_len=11, batch_seqs=2, device=CPU)
    results = [evaluate(model, stream, lut, **common),
               sliding_bpb(model, stream, lut, stride=4, **common),
               ttt_bpb(model, stream, lut, stride=4, cfg=TTTConfig(chunk_tokens=11, lr=0.0),
                       **common)]
    for result in results:
        assert (result["tokens"], result["bytes"]) == (33, 60)
        assert result["bpb"] == pytest.approx(96 / 60, rel=1e-12)
        assert result["loss"] == pytest.approx(96 * math.log(2) / 33, rel=1e-12)


def tiny_model(vocab=64, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2,
                          num_kv_heads=1)).eval()
    with torch.no_grad():  # zero-initialised projections would make the model ignore context
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def text():
    """A stream with structure to learn (a noisy repeating pattern) and a byte table."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 64, 48)
    stream = np.tile(pattern, 30)[:1200]
    noise = rng.random(len(stream)) < 0.2
    stream[noise] = rng.integers(0, 64, noise.sum())
    lut = ByteLUT(rng.integers(1, 4, 64), rng.random(64) < 0.5, np.arange(64) < 2)
    return stream, lut


COMMON = dict(seq_len=16, stride=4, batch_seqs=7, device=CPU)


def per_chunk(result):
    return result["chunks"]["nll_nats"]


def test_ttt_with_lr_zero_is_sliding(text):
    stream, lut = text
    cfg = TTTConfig(chunk_tokens=96, lr=0.0, epochs=2, batch_seqs=3)
    ttt = ttt_bpb(tiny_model(), stream, lut, cfg=cfg, **COMMON)
    same_chunks = sliding_bpb(tiny_model(), stream, lut, chunk_tokens=96, **COMMON)
    one_chunk = sliding_bpb(tiny_model(), stream, lut, **COMMON)
    assert per_chunk(ttt) == per_chunk(same_chunks)  # identical batches, unchanged weights
    assert ttt["bpb"] == pytest.approx(one_chunk["bpb"], rel=1e-12)
    assert (ttt["tokens"], ttt["bytes"]) == (one_chunk["tokens"], one_chunk["bytes"])


def test_ttt_learns_and_scores_every_target_once_in_one_pass(text):
    stream, lut = text
    cfg = TTTConfig(chunk_tokens=96, lr=0.05, epochs=2, batch_seqs=3)
    ttt = ttt_bpb(tiny_model(), stream, lut, cfg=cfg, **COMMON)
    slid = sliding_bpb(tiny_model(), stream, lut, chunk_tokens=96, **COMMON)
    assert ttt["bpb"] < slid["bpb"] - 0.05  # the repeating pattern is learnable
    assert per_chunk(ttt)[0] == per_chunk(slid)[0]  # nothing trained before the first score
    n = (len(stream) - 1) // 16 * 16  # roundtrip's targets
    assert ttt["tokens"] == n and ttt["chunks"]["tokens"] == [min(96, n - lo)
                                                              for lo in range(0, n, 96)]
    assert ttt["lr_schedule"] == lr_schedule(cfg, len(ttt["chunks"]["tokens"]))


def test_later_chunks_never_change_earlier_scores(text):
    """C1 + C3: the score of chunks 0..k depends on no token after chunk k."""
    stream, lut = text
    cfg = TTTConfig(chunk_tokens=96, lr=0.05, epochs=2, batch_seqs=3)
    k = 4
    changed = stream.copy()
    after = (k + 1) * 96 + 1  # the first token that is neither a target nor an input of chunk k
    changed[after:] = np.random.default_rng(1).integers(0, 64, len(stream) - after)
    a = per_chunk(ttt_bpb(tiny_model(), stream, lut, cfg=cfg, **COMMON))
    b = per_chunk(ttt_bpb(tiny_model(), changed, lut, cfg=cfg, **COMMON))
    assert a[:k + 1] == b[:k + 1]
    assert all(x != y for x, y in zip(a[k + 1:], b[k + 1:], strict=True))


def test_score_comes_before_the_update():
    """C3 on unlearnable data: iid uniform tokens. A model that scores a chunk after training on
    it memorises it (loss far under ln V); score-first TTT never gets under ln V."""
    vocab, seq_len = 64, 32
    stream = np.random.default_rng(0).integers(0, vocab, 4 * 128 + 1)
    lut = ByteLUT(np.ones(vocab, dtype=np.int64), np.zeros(vocab, bool), np.zeros(vocab, bool))
    cfg = TTTConfig(chunk_tokens=128, epochs=20, lr=0.5, batch_seqs=4, grad_clip=0)
    common = dict(seq_len=seq_len, batch_seqs=8, device=CPU)
    result = ttt_bpb(tiny_model(), stream, lut, cfg=cfg, stride=seq_len, **common)
    losses = np.divide(per_chunk(result), result["chunks"]["tokens"])
    assert (losses > math.log(vocab) - 0.1).all()
    # the control: train on chunk 1, then score it
    model = tiny_model()
    params = trainable(model, [])
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    train_chunk(model, optimizer, params, stream, sequence_starts(128, 256, seq_len), cfg=cfg,
                seq_len=seq_len, device=CPU, autocast=False, rank=0, world=1)
    rows = chunk_rows(plan(512, seq_len, seq_len), 512, 128)[1]
    nll, tokens, _ = score_rows(model, stream, rows, lut, **common).tolist()
    assert nll / tokens < math.log(vocab) - 1.0


def test_only_the_selected_parameters_adapt(text):
    stream, lut = text
    model, before = tiny_model(), tiny_model().state_dict()
    cfg = TTTConfig(chunk_tokens=96, lr=0.05, epochs=1, params=["blocks.0.*"])
    ttt_bpb(model, stream, lut, cfg=cfg, **COMMON)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all(n.startswith("blocks.0.") for n in changed)
    with pytest.raises(ValueError, match=r"ttt.params \['block.*'\] match no parameter"):
        ttt_bpb(tiny_model(), stream, lut, cfg=TTTConfig(params=["block.*"]), **COMMON)


def test_lr_is_a_cosine_across_chunks():
    lrs = lr_schedule(TTTConfig(lr=0.01), 5)
    assert lrs[0] == 0.01 and lrs[2] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_schedule(TTTConfig(lr=0.01), 1) == [0.0]


def test_bad_ttt_settings(text):
    stream, lut = text
    with pytest.raises(ValueError, match="ttt.epochs = 0"):
        TTTConfig(epochs=0)
    with pytest.raises(ValueError, match="chunk_tokens = 8: must be >= the eval seq_len"):
        ttt_bpb(tiny_model(), stream, lut, cfg=TTTConfig(chunk_tokens=8), **COMMON)


@pytest.mark.parametrize("chunk", [1, 5, 16, 40, 1000])
def test_chunks_tile_the_plan(chunk):
    rows = plan(200, 16, 6)
    parts = chunk_rows(rows, 200, chunk)
    counts = np.zeros(200, dtype=int)
    for c, part in enumerate(parts):
        for start, first, end in part:
            assert c * chunk <= first < end <= min((c + 1) * chunk, 200)
            assert start <= first and end <= start + 16
            counts[first:end] += 1
    assert (counts == 1).all() and len(parts) == -(-200 // chunk)
