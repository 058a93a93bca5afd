"""Float vs quantized generation: the shared-stream sampler, its null, and the teacher-forced KL."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.analysis.generation import GenerationConfig, compare, plot_generation, sample
from pgolf.model.gpt import GPT, GPTConfig

V = 64
CFG = GenerationConfig(prompts=3, prompt_tokens=5, new_tokens=12, temperature=0.8, seed=7)


def tiny_gpt(seed: int = 0, std: float = 0.3) -> GPT:
    # fresh init zeroes the output projections, so every block is the identity: randomise all
    model = GPT(GPTConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std, generator=g)
    return model.eval()


def perturbed(model: GPT, scale: float = 0.05, seed: int = 1) -> GPT:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def tokens(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


class Markov(nn.Module):
    """A stub whose next-token logits are a fixed row per previous token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def inputs(cfg: GenerationConfig = CFG):
    return (tokens((cfg.prompts, cfg.prompt_tokens), 10),
            tokens((cfg.prompts, cfg.new_tokens), 11))


def test_identical_models_never_diverge_and_have_zero_kl():
    model = tiny_gpt()
    rows = compare(model, {"same": copy.deepcopy(model)}, *inputs(), cfg=CFG, max_context=16)
    assert [row["prompt"] for row in rows] == [0, 1, 2, "all"]
    for row in rows:
        assert row["variant"] == "same"
        assert row["first_divergence"] == CFG.new_tokens and row["agreement"] == 1.0
        assert abs(row["kl"]) < 1e-12 and row["dnll"] == 0.0
        assert row["nll_float"] == row["nll_quant"]


def test_perturbed_copy_kl_matches_a_hand_computation():
    model = tiny_gpt()
    other = perturbed(model)
    prompts, conts = inputs()
    rows = compare(model, {"noisy": other}, prompts, conts, cfg=CFG, max_context=32)
    seq = torch.cat([prompts[:1], conts[:1]], dim=1)
    with torch.no_grad():
        la = model(seq)[0, CFG.prompt_tokens - 1:-1].double()
        lb = other(seq)[0, CFG.prompt_tokens - 1:-1].double()
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=la),
                                           torch.distributions.Categorical(logits=lb))
    nll_a = F.cross_entropy(la, conts[0], reduction="none")
    nll_b = F.cross_entropy(lb, conts[0], reduction="none")
    row = rows[0]
    assert row["kl"] > 1e-6
    assert row["kl"] == pytest.approx(float(kl.mean()), rel=1e-9)
    assert row["kl_se"] == pytest.approx(float(kl.std() / math.sqrt(CFG.new_tokens)), rel=1e-9)
    assert row["nll_float"] == pytest.approx(float(nll_a.mean()), rel=1e-9)
    assert row["nll_quant"] == pytest.approx(float(nll_b.mean()), rel=1e-9)
    assert row["dnll"] == pytest.approx(float((nll_b - nll_a).mean()), rel=1e-6, abs=1e-12)
    # the summary's SE is over the per-prompt means, not over all positions
    kls = np.array([r["kl"] for r in rows[:-1]])
    assert rows[-1]["kl"] == pytest.approx(kls.mean())
    assert rows[-1]["kl_se"] == pytest.approx(kls.std(ddof=1) / math.sqrt(len(kls)))


def test_temperature_zero_is_the_greedy_rollout():
    model = tiny_gpt(seed=3, std=0.5)
    prompts = tokens((2, 6), 12)
    for max_context in (4, 64):  # 4 < 6: the window must slide over the prompt too
        got = sample(model, prompts, steps=10, seed=0, temperature=0.0,
                     max_context=max_context)
        seq = prompts
        with torch.no_grad():
            for _ in range(10):
                nxt = model(seq[:, -max_context:])[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(got, seq[:, 6:])


def test_sampler_draws_gumbel_max_from_the_seeded_stream():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1],
                          [0.05, 0.05, 0.05, 0.85], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    model = Markov(probs.log().float())
    start = torch.zeros(1, 1, dtype=torch.long)
    for temperature in (1.0, 2.0):
        generator = torch.Generator().manual_seed(9)
        expected, prev = [], 0  # the prompt is token 0
        for _ in range(12):
            u = torch.rand((1, 4), generator=generator, dtype=torch.float64)[0]
            prev = int((probs[prev].log().float().double() / temperature
                        - torch.log(-torch.log(u))).argmax())
            expected.append(prev)
        got = sample(model, start, steps=12, seed=9, temperature=temperature, max_context=8)
        assert got[0].tolist() == expected
    # the draw follows the distribution: token frequencies from one state match its probabilities
    counts = torch.zeros(4)
    repeated = Markov(probs[1].log().float().expand(4, 4).clone())
    for seed in range(40):
        for token in sample(repeated, start, steps=50, seed=seed, temperature=1.0,
                            max_context=2)[0]:
            counts[token] += 1
    assert torch.allclose(counts / counts.sum(), probs[1].float(), atol=0.04)


def test_independent_streams_give_the_null_far_below_the_ceiling():
    model = Markov(torch.zeros(V, V))  # uniform over 64 tokens: the highest entropy there is
    cfg = GenerationConfig(prompts=4, prompt_tokens=2, new_tokens=40, temperature=1.0, seed=3)
    rows = compare(model, {"self": model}, *inputs(cfg), cfg=cfg, max_context=64)
    summary = rows[-1]
    assert summary["agreement"] == 1.0 and summary["first_divergence"] == cfg.new_tokens
    assert summary["agreement_null"] < 0.15  # chance is 1/64
    assert summary["first_divergence_null"] < 5


def test_the_gpt_null_is_reproducible_and_the_quantized_stream_is_shared():
    model = tiny_gpt(std=0.1)  # small weights: a high-entropy GPT
    # a slightly perturbed copy tracks the float model on the shared stream (agreement 0.75 at
    # these seeds) while the float model with itself on independent streams does not (~0.06)
    rows = compare(model, {"q": perturbed(model, 0.003)}, *inputs(), cfg=CFG,
                   max_context=32)
    again = compare(model, {"q": perturbed(model, 0.003)}, *inputs(), cfg=CFG,
                    max_context=32)
    assert rows == again
    assert rows[-1]["agreement_null"] < 0.3 < 0.6 < rows[-1]["agreement"] < 1
    assert rows[-1]["first_divergence_null"] + 3 < rows[-1]["first_divergence"] < CFG.new_tokens


def test_bad_inputs():
    model = tiny_gpt()
    prompts, conts = inputs()
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, prompts, steps=4, seed=0, temperature=-1.0, max_context=8)
    with pytest.raises(ValueError, match="tokens >= 1"):
        sample(model, torch.zeros(3, 0, dtype=torch.long), steps=4, seed=0, temperature=1.0,
               max_context=8)
    with pytest.raises(ValueError, match="continuations"):
        compare(model, {"x": model}, prompts, conts[:, :-1], cfg=CFG, max_context=32)
    with pytest.raises(ValueError, match="max_context"):
        compare(model, {"x": model}, prompts, conts, cfg=CFG, max_context=CFG.new_tokens)


def test_plot_writes_a_png(tmp_path):
    model = tiny_gpt()
    rows = compare(model, {"a": perturbed(model), "b": perturbed(model, 0.2)}, *inputs(),
                   cfg=CFG, max_context=32)
    assert [r["variant"] for r in rows].count("b") == CFG.prompts + 1
    out = tmp_path / "generation.png"
    plot_generation(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
