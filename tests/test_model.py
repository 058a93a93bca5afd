"""Every switch of the GPT, checked against its definition."""

import math

import pytest
import torch
from torch import nn

from pgolf.model.gpt import (
    GPT,
    Block,
    GPTConfig,
    Rotary,
    exclude_self_value,
    quantizable_matrices,
    rms_norm,
)

R0409 = dict(num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, loop_start=3, loop_end=5,
             num_loops=2, skip_gates=True, xsa_last_n=11, parallel_from=7, ln_scale=True,
             rope_dims=16, qk_gain_init=5.25, vocab_size=8192)


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
    return GPTConfig(**{**base, **kw})


def test_shapes_and_losses():
    torch.manual_seed(0)
    model = GPT(tiny(loop_start=1, loop_end=2, num_loops=1, skip_gates=True, xsa_last_n=2))
    x = torch.randint(0, 64, (3, 10))
    assert model(x).shape == (3, 10, 64)
    per_token = model(x, x, reduction="none")
    assert per_token.shape == (3, 10) and per_token.dtype == torch.float32
    assert torch.allclose(per_token.mean(), model(x, x))


def test_virtual_layer_sequence_matches_the_records():
    cfg = GPTConfig(**R0409)
    assert cfg.layer_sequence(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert cfg.split(True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert cfg.split(False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert cfg.num_skips == 8
    c1 = GPTConfig(**{**R0409, "loop_start": 4, "loop_end": 5, "num_loops": 3})  # PR #1420
    assert c1.split(True) == ([0, 1, 2, 3, 4, 5, 4, 5], [4, 5, 4, 5, 6, 7, 8, 9, 10])
    assert GPTConfig(num_layers=9, model_dim=64).split(False) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])


def test_looping_reuses_the_same_blocks():
    model = GPT(tiny(loop_start=1, loop_end=2, num_loops=2))
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    model.looping = True
    model(torch.randint(0, 64, (1, 5)))
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3]
    assert len(model.blocks) == 4  # passes share weights: no per-pass blocks


class AddConstant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, x0, mask=None):
        return x + self.value


def test_gated_skip_is_a_lerp_toward_the_weighted_skip():
    torch.manual_seed(0)
    model = GPT(tiny(num_layers=2, skip_gates=True))
    model.blocks = nn.ModuleList([AddConstant(0.5), AddConstant(0.0)])
    with torch.no_grad():
        model.skip_weights.uniform_(0.5, 2.0)
        model.skip_gates.normal_()
    idx = torch.randint(0, 64, (2, 6))
    e = rms_norm(model.tok_emb(idx)) + 0.5  # encoder output, pushed and then popped
    w, g = model.skip_weights[0], torch.sigmoid(model.skip_gates[0])
    expected = rms_norm(g * e + (1 - g) * (w * e))
    assert torch.allclose(model.hidden(idx), expected, atol=1e-6)
    ungated = GPT(tiny(num_layers=2))
    ungated.blocks = nn.ModuleList([AddConstant(0.5), AddConstant(0.0)])
    e2 = rms_norm(ungated.tok_emb(idx)) + 0.5
    assert torch.allclose(ungated.hidden(idx), rms_norm(e2 + e2), atol=1e-6)  # w = 1 at init


def test_xsa_output_is_orthogonal_to_the_tokens_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 7, 8, 16), torch.randn(2, 7, 4, 16)  # 8 query heads over 4 KV heads
    out = exclude_self_value(y, v)
    v_hat = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out + (y * v_hat).sum(-1, keepdim=True) * v_hat, y, atol=1e-5)
    model = GPT(tiny(xsa_last_n=2))
    assert [b.attn.xsa for b in model.blocks] == [False, False, True, True]


def capture_inputs(block: Block) -> dict:
    seen = {}
    block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0]))
    block.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0]))
    return seen


def randomise(block: Block) -> None:
    with torch.no_grad():
        for p in block.parameters():
            if p.ndim == 2 and p.shape[0] != 2:
                p.normal_(std=0.2)


def test_ln_scale_multiplies_both_norms_by_inverse_sqrt_depth():
    torch.manual_seed(0)
    cfg = tiny(ln_scale=True)
    block = Block(cfg, index=3)
    randomise(block)
    seen = capture_inputs(block)
    x = torch.randn(2, 5, 32)
    block(x, x)
    for name in ("attn", "mlp"):
        rms = seen[name].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, 1 / math.sqrt(4)), atol=1e-4), name
    assert Block(tiny(), index=3).norm_scale == 1.0


def test_parallel_residual_wiring():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    for parallel_from, same_input in ((0, True), (None, False)):
        block = Block(tiny(parallel_from=parallel_from, resid_mix=False), index=1)
        randomise(block)
        seen = capture_inputs(block)
        out = block(x, x)
        assert torch.equal(seen["attn"], seen["mlp"]) == same_input
        if same_input:
            h = rms_norm(x)
            manual = x + block.attn_scale * block.attn(h) + block.mlp_scale * block.mlp(h)
            assert torch.allclose(out, manual, atol=1e-6)


def test_partial_rope_leaves_the_other_dims_alone():
    rope = Rotary(tiny(rope_dims=4))
    x = torch.randn(1, 6, 2, 8)
    out = rope(x)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0: no rotation
    assert torch.allclose(out[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)
    assert not torch.allclose(out[:, 3, :, :4], x[:, 3, :, :4])


def test_q_gain_and_activation_switches():
    model = GPT(tiny(qk_gain_init=5.25))
    assert torch.equal(model.blocks[0].attn.q_gain, torch.full((4,), 5.25))
    relu = GPT(tiny(activation="relu2")).blocks[0].mlp
    assert relu.slope == 0.0
    with pytest.raises(ValueError, match="activation"):
        tiny(activation="gelu")


def test_init_output_projections_zero_and_others_orthogonal():
    model = GPT(tiny(num_layers=2, model_dim=64, num_heads=4))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        W = block.attn.c_q.weight
        assert torch.allclose(W @ W.T, torch.eye(64), atol=1e-5)


def test_quantizable_matrices_match_the_checkpoint():
    for kw in (dict(), dict(tie_embeddings=False), R0409):
        cfg = GPTConfig(**kw)
        state = GPT(cfg).state_dict()
        listed = dict(quantizable_matrices(cfg))
        assert all(tuple(state[name].shape) == shape for name, shape in listed.items())
        matrices = {n for n, t in state.items() if t.ndim == 2 and t.numel() > 8 * cfg.model_dim}
        assert matrices == set(listed)
    assert len(quantizable_matrices(GPTConfig(**R0409))) == 67  # as the records log


def test_config_errors():
    with pytest.raises(ValueError, match="loop_start"):
        tiny(num_loops=1, loop_start=2, loop_end=9)
    with pytest.raises(ValueError, match="must divide"):
        tiny(num_kv_heads=3)
