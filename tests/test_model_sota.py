"""The SOTA record's model switches: SmearGate, the head gate, two lanes, document isolation."""

import pytest
import torch

import pgolf.model.gpt as gpt
from pgolf.model.gpt import GPT, Block, GPTConfig, document_mask, quantizable_matrices, rms_norm
from pgolf.train.trainer import OptimConfig, build_optimizers

BOS = 1
ALL = dict(smear_gate=True, attn_gate=True, gate_window=6, doc_isolation=True, bos_id=BOS,
           parallel_from=2, parallel_lanes=2, xsa_last_n=4, skip_gates=True, rope_dims=4)


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
    return GPTConfig(**{**base, **kw})


def randomised(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every parameter is random: zero-init projections and gates hide wiring."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "tok_emb.weight":
                p.copy_(p + 0.3 * torch.randn_like(p))
    return model


def tokens(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    """Documents of the given lengths, each BOS then ordinary tokens (ids >= 2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([BOS]), torch.randint(2, 64, (n - 1,), generator=g)])
            for n in lengths]


def test_defaults_add_no_parameters():
    names = set(GPT(tiny()).state_dict())
    assert not [n for n in names if "gate" in n or "lane" in n or "smear" in n]
    assert tiny().parallel_lanes == 1 and not tiny().two_lane(3)


def test_smear_gate_and_head_gate_at_init():
    torch.manual_seed(0)
    base = GPT(tiny(xsa_last_n=2))
    with torch.no_grad():
        for block in base.blocks:
            block.attn.proj.weight.normal_(std=0.2)
            block.mlp.proj.weight.normal_(std=0.2)
    gated = GPT(tiny(xsa_last_n=2, smear_gate=True, attn_gate=True))
    missing, unexpected = gated.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("gate" in n or "smear" in n for n in missing)
    with torch.no_grad():  # sigmoid(0) = 1/2 on every head: half the output projection
        for block in base.blocks:
            block.attn.proj.weight.mul_(0.5)
    idx = torch.randint(0, 64, (2, 9))
    assert torch.equal(gated.initial_state(idx).x0, base.initial_state(idx).x0)
    assert torch.allclose(gated(idx), base(idx), atol=1e-5)


def test_head_gate_reads_the_first_window_of_the_normed_input():
    torch.manual_seed(0)
    cfg = tiny(attn_gate=True, gate_window=5, attn_gate_scale=0.7)
    attn = Block(cfg, index=0).attn
    seen = []
    attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = rms_norm(torch.randn(2, 6, 32))
    attn(x)  # gate at zero: the ungated output y halved
    with torch.no_grad():
        attn.gate.normal_()
    attn(x)
    y = 2 * seen[0].view(2, 6, 4, 8)
    g = torch.sigmoid(0.7 * x[..., :5] @ attn.gate.T)  # (B, T, H)
    assert torch.allclose(seen[1], (g[..., None] * y).reshape(2, 6, 32), atol=1e-6)


def test_smear_gate_matches_its_definition():
    cfg = tiny(smear_gate=True, gate_window=7)
    model = randomised(cfg)
    idx = torch.cat(tokens(4, 5)).view(1, 9)
    e = model.tok_emb(idx)[0]
    w, lam = model.smear_gate[0], model.smear_lambda[0]
    rows = [e[0]] + [e[t] + (idx[0, t] != BOS) * lam * torch.sigmoid(w @ e[t, :7]) * e[t - 1]
                     for t in range(1, 9)]
    expected = rms_norm(torch.stack(rows))
    assert torch.allclose(model.initial_state(idx).x0[0], expected, atol=1e-6)
    assert not torch.allclose(expected[5], rms_norm(e[5]), atol=1e-3)  # the smear is visible
    assert torch.allclose(expected[4], rms_norm(e[4]), atol=1e-6)  # BOS at position 4


def test_bos_fix_keeps_the_next_document_blind_to_the_previous(monkeypatch):
    model = randomised(tiny(**ALL))
    first, second = tokens(6, 7)
    changed = first.clone()
    changed[-1] = (first[-1] + 5) % 62 + 2
    packed, packed_changed = (torch.cat([d, second])[None] for d in (first, changed))
    doc2 = slice(len(first), None)

    def second_doc_moves() -> bool:
        return not torch.allclose(model(packed)[0, doc2], model(packed_changed)[0, doc2],
                                  atol=1e-6)

    assert not second_doc_moves()
    original = gpt.smear_previous
    monkeypatch.setattr(gpt, "smear_previous",  # no BOS mask: bos_id matches no token
                        lambda e, idx, **kw: original(e, idx, **{**kw, "bos_id": -1}))
    assert second_doc_moves()


def test_packed_documents_score_as_if_run_alone():
    model = randomised(tiny(**ALL, num_loops=1, loop_start=1, loop_end=1))
    model.looping = True
    # Row 0 opens mid-document (no BOS first), as a sliding window does; row 1 has three.
    rows = [[tokens(5, seed=3)[0][1:], *tokens(8, 4, seed=4)], tokens(6, 3, 7, seed=5)]
    packed = torch.stack([torch.cat(docs) for docs in rows])
    logits = model(packed)
    for r, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            assert torch.allclose(logits[r, start:start + len(doc)], alone, atol=1e-5)
            start += len(doc)
    leaky = GPT(GPTConfig(**{**model.cfg.__dict__, "doc_isolation": False}))
    leaky.load_state_dict(model.state_dict())
    leaky.looping = True
    assert not torch.allclose(leaky(packed)[1, 6:9], model(rows[1][1][None])[0], atol=1e-3)


@torch.no_grad()  # FlexAttention has no backward on the CPU
def test_document_mask_and_its_flex_form_agree():
    model = randomised(tiny(**ALL))
    idx = torch.stack([torch.cat(tokens(4, 6, 6, seed=6)), torch.cat(tokens(9, 7, seed=7))])
    mask = document_mask(idx, BOS)
    assert mask.shape == (2, 1, 16, 16)
    assert mask[0, 0, 5].tolist() == [False] * 4 + [True] * 2 + [False] * 10
    depth = len(model.cfg.layer_sequence(model.looping))
    state = model.initial_state(idx)
    state.mask = document_mask(idx, BOS, block=True)
    flex = model.output(model.advance(state, 0, depth))
    assert torch.allclose(flex, model.hidden(idx), atol=1e-5)


def test_two_lane_block_matches_a_hand_computation():
    block = Block(tiny(parallel_from=2, parallel_lanes=2, ln_scale=True), index=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)
    lane0, lane1, x0 = torch.randn(3, 2, 5, 32).unbind(0)
    mix, s = block.resid_mix, 1 / 3 ** 0.5
    attn = block.attn_scale * block.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * s)
    mlp = block.mlp_scale * block.mlp(rms_norm(lane1) * s)
    r, post = block.lane_resid, block.lane_post
    out0, out1 = block.lanes(lane0, lane1, x0)
    assert torch.allclose(out0, r[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp, atol=1e-6)
    assert torch.allclose(out1, r[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp, atol=1e-6)
    assert torch.equal(Block(tiny(parallel_from=2, parallel_lanes=2), 3).lane_resid,
                       torch.full((2,), 1.1))


def test_two_lanes_in_the_network():
    """Skips go into lane 0 only, after the lanes split; the head reads the lanes' mean."""
    model = randomised(tiny(parallel_from=2, parallel_lanes=2, skip_gates=False))
    idx = torch.randint(0, 64, (2, 7))
    x0 = model.initial_state(idx).x0
    s0 = model.blocks[0](x0, x0)
    s1 = model.blocks[1](s0, x0)
    w = model.skip_weights
    lane0, lane1 = model.blocks[2].lanes(s1 + w[0] * s1, s1, x0)
    lane0, lane1 = model.blocks[3].lanes(lane0 + w[1] * s0, lane1, x0)
    assert torch.allclose(model.hidden(idx), rms_norm(0.5 * (lane0 + lane1)), atol=1e-5)
    state = model.advance(model.initial_state(idx), 0, 3)  # the sweep's prefix cache
    assert state.lane1 is not None
    assert torch.equal(model.output(model.advance(state, 3, 4)), model.hidden(idx))


def test_gradients_reach_every_new_parameter_and_adamw_trains_them():
    model = randomised(tiny(**ALL))
    idx = torch.cat(tokens(5, 6, 5)).view(2, 8)
    model(idx, idx).backward()
    new = [n for n, _ in model.named_parameters()
           if any(k in n for k in ("smear", "attn.gate", "lane_"))]
    assert len(new) == 2 + 4 + 2 * 2  # smear w and lambda, 4 head gates, 2 two-lane blocks
    params = dict(model.named_parameters())
    for name in new:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    muon, adam = build_optimizers(model, OptimConfig())
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adam = {id(p) for g in adam.param_groups for p in g["params"]}
    assert all(id(params[n]) in in_adam and id(params[n]) not in in_muon for n in new)


def test_quantizable_matrices_exclude_the_gates():
    cfg = tiny(**ALL)
    state = GPT(cfg).state_dict()
    listed = dict(quantizable_matrices(cfg))
    assert listed == dict(quantizable_matrices(tiny()))
    big = {n for n, t in state.items() if t.ndim == 2 and t.numel() > 8 * cfg.model_dim}
    assert big == set(listed)


def test_all_switches_run_under_bf16_autocast():
    model = randomised(tiny(**ALL))
    idx = torch.cat(tokens(5, 6, 5)).view(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    assert torch.isfinite(loss) and abs(loss.item() - model(idx, idx).item()) < 0.1


@pytest.mark.parametrize("kw, key", [
    (dict(parallel_lanes=2), "model.parallel_from"),
    (dict(parallel_lanes=3, parallel_from=2), "model.parallel_lanes"),
    (dict(parallel_lanes=2, parallel_from=1), "model.parallel_from"),  # layer 1: encoder
    (dict(parallel_lanes=2, parallel_from=2, num_loops=1, loop_start=1, loop_end=2),
     "model.parallel_from"),  # layer 2 loops back to layer 1
    (dict(smear_gate=True, gate_window=33), "model.gate_window"),
    (dict(attn_gate=True, gate_window=0), "model.gate_window"),
    (dict(smear_gate=True, bos_id=64), "model.bos_id"),
    (dict(doc_isolation=True, bos_id=-1), "model.bos_id"),
])
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny(**kw)
    tiny(gate_window=33, bos_id=64)  # unused by switches that are off: no error
