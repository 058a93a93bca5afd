"""Hessian collection: X^T X of each matrix's real inputs, looped passes included."""

import torch
from safetensors.torch import load_file

from pgolf.model.gpt import GPT, GPTConfig, quantizable_matrices
from pgolf.quant.hessian import collect_hessians, save_hessians


def model(**kw):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, num_layers=3, model_dim=16, num_heads=2, num_kv_heads=1,
                      **kw))
    with torch.no_grad():  # non-zero output projections, so every block changes the stream
        for block in m.blocks:
            block.attn.proj.weight.normal_(std=0.1)
            block.mlp.proj.weight.normal_(std=0.1)
    return m


def test_hessians_are_x_transpose_x_of_the_inputs():
    m = model()
    batches = [torch.randint(0, 50, (2, 9)) for _ in range(3)]
    seen = []
    m.blocks[1].mlp.fc.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, 16)))
    hessians = collect_hessians(m, batches)
    assert set(hessians) == {n for n, _ in quantizable_matrices(m.cfg)}
    X = torch.cat(seen)
    H, n = hessians["blocks.1.mlp.fc.weight"]
    assert n == 54 and torch.allclose(H, X.T @ X / 54, atol=1e-6)
    h = torch.cat([m.hidden(x).reshape(-1, 16) for x in batches])
    assert torch.allclose(hessians["tok_emb.weight"][0], h.T @ h / 54, atol=1e-5)  # head input
    H_proj = hessians["blocks.0.mlp.proj.weight"][0]
    assert H_proj.shape == (64, 64) and torch.allclose(H_proj, H_proj.T)
    assert torch.linalg.eigvalsh(H_proj).min() > -1e-5


def test_looped_layers_accumulate_every_pass():
    m = model(loop_start=1, loop_end=1, num_loops=2)
    m.looping = True
    hessians = collect_hessians(m, [torch.randint(0, 50, (2, 5))])
    assert hessians["blocks.1.attn.c_q.weight"][1] == 3 * hessians["blocks.0.attn.c_q.weight"][1]


def test_untied_head_and_file(tmp_path):
    m = model(tie_embeddings=False)
    hessians = collect_hessians(m, [torch.randint(0, 50, (1, 7))])
    assert torch.equal(hessians["tok_emb.weight"][0], torch.eye(16))
    assert hessians["lm_head.weight"][0].shape == (16, 16)
    save_hessians(tmp_path / "h.safetensors", hessians, {"batches": 1})
    loaded = load_file(tmp_path / "h.safetensors")
    assert torch.equal(loaded["lm_head.weight"], hessians["lm_head.weight"][0])
