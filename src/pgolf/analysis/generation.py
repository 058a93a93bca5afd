"""Float vs quantized generation: paired sampling on one random stream, and teacher-forced KL.

Both models continue the same prompts by Gumbel-max sampling with the *same* Gumbel noise at each
step, so two identical distributions emit identical tokens and any divergence is the models'. The
Gumbel coupling is near-maximal: two distributions at total variation d disagree with probability
at most 2d / (1 + d), where a shared uniform through the inverse CDF (ordered by token id) lets
small differences pile up along the CDF and disagrees far more often. How early the two diverge is
read against the same comparison of the float model with itself on two independent streams (what
sampling alone gives) and against `new_tokens` (the ceiling for an identical model). Teacher
forcing on the true continuation gives the per-position KL(p_float || p_quant) and the NLL of
both, each with its standard error as the noise floor.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.analysis.artifacts import quantized_models
from pgolf.analysis.table import write_analysis
from pgolf.eval.bpb import val_stream
from pgolf.eval.bpb import windows as val_windows
from pgolf.model.checkpoint import load_model
from pgolf.plot import figure

DEFINITION = (
    "Per prompt (and an 'all' row of means over prompts): each model continues the prompt for "
    "new_tokens steps from its own history, token t = argmax(logits / temperature + g_t) "
    "(Gumbel-max; argmax of the logits at temperature 0), with the Gumbel noise g_t per (prompt, "
    "step, token) drawn from a generator seeded with `seed` and shared by both models. "
    "first_divergence is the first step where the float and quantized tokens differ (new_tokens "
    "if never); agreement is the fraction of steps where they are equal. Teacher-forced on "
    "prompt + true continuation at temperature 1: kl is the mean over continuation positions of "
    "KL(p_float || p_quant) in nats (float64 log_softmax); nll_float and nll_quant are the mean "
    "NLL of the true tokens; dnll is the mean of nll_quant - nll_float, paired per position.")
NULL = (
    "first_divergence_null and agreement_null compare the float model with itself on two "
    "independent noise streams (seeds seed and seed + 1): the divergence and agreement that "
    "sampling alone produces; a quantized model is close to the float one as far as its "
    "statistics sit above this null and near the identical-model ceiling (new_tokens, 1). KL is "
    "0 for a model against itself, so KL and NLL are read against their standard errors: kl_se "
    "and dnll_se are over continuation positions per prompt, and over the per-prompt means in "
    "the 'all' row.")


@dataclass(kw_only=True)
class GenerationConfig:
    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    temperature: float = 0.8
    seed: int = 42

    def __post_init__(self):
        for name in ("prompts", "prompt_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"generation.{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature={self.temperature} must be >= 0")


def next_token(logits: torch.Tensor, gumbel: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max draw from softmax(logits / temperature) per row; argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def gumbel_noise(generator: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log U) with U in the open interval (0, 1)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-16)))


@torch.no_grad()
def sample(model, prompts: torch.Tensor, *, steps: int, seed: int, temperature: float,
           max_context: int) -> torch.Tensor:
    """Continue each prompt for `steps` tokens; step t adds the t-th (prompts, vocab) block of
    Gumbel noise of the stream `seed` to the scaled logits. The full forward is rerun on the
    last `max_context` tokens each step."""
    check_prompts(prompts)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if max_context < 1:
        raise ValueError(f"max_context={max_context} must be >= 1")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    seq = prompts
    for _ in range(steps):
        logits = model(seq[:, -max_context:])[:, -1]
        gumbel = gumbel_noise(generator, tuple(logits.shape))
        seq = torch.cat([seq, next_token(logits, gumbel, temperature)[:, None]], dim=1)
    return seq[:, prompts.size(1):]


def check_prompts(prompts: torch.Tensor) -> None:
    if prompts.dim() != 2 or prompts.size(1) < 1:
        raise ValueError(f"prompts {tuple(prompts.shape)} must be (prompts, tokens >= 1)")


def divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per row: the first index where a and b differ (the length if none), and the fraction of
    equal positions."""
    equal = a == b
    n = equal.size(1)
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else n for row in equal]
    return first, equal.double().mean(dim=1).tolist()


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    n = len(values)
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), se


@torch.no_grad()
def teacher_forced(float_model, quant_model, prompts: torch.Tensor, continuations: torch.Tensor,
                   *, max_context: int) -> dict[str, torch.Tensor]:
    """Per (prompt, continuation position): KL(p_float || p_quant) and both NLLs, float64."""
    n = continuations.size(1)
    if n + 1 > max_context:  # the first continuation token must still see its prompt token
        raise ValueError(f"new_tokens={n} needs max_context > {n}, got {max_context}")
    # position i predicts token i + 1, so the last true token is never an input
    inputs = torch.cat([prompts, continuations], dim=1)[:, :-1][:, -max_context:]
    logp = [F.log_softmax(m.eval()(inputs)[:, -n:].double(), dim=-1)
            for m in (float_model, quant_model)]
    kl = (logp[0].exp() * (logp[0] - logp[1])).sum(dim=-1)
    nll = [-lp.gather(-1, continuations[..., None]).squeeze(-1) for lp in logp]
    return {"kl": kl, "nll_float": nll[0], "nll_quant": nll[1]}


def check_shapes(prompts: torch.Tensor, continuations: torch.Tensor,
                 cfg: GenerationConfig) -> None:
    check_prompts(prompts)
    want = {"prompts": (cfg.prompts, cfg.prompt_tokens),
            "continuations": (cfg.prompts, cfg.new_tokens)}
    for name, tensor in (("prompts", prompts), ("continuations", continuations)):
        if tuple(tensor.shape) != want[name]:
            raise ValueError(f"{name} {tuple(tensor.shape)} != {want[name]} from the config")


def compare(float_model, quant_models: dict, prompts: torch.Tensor, continuations: torch.Tensor,
            *, cfg: GenerationConfig, max_context: int) -> list[dict]:
    """Per quantized model (keyed by variant name): one row per prompt and an 'all' row with
    the shared-stream divergence, its independent-stream null, and teacher-forced KL / NLL
    (see DEFINITION and NULL). The float model's two samples are drawn once for all."""
    check_shapes(prompts, continuations, cfg)
    draw = {"steps": cfg.new_tokens, "temperature": cfg.temperature, "max_context": max_context}
    a = sample(float_model, prompts, seed=cfg.seed, **draw)
    first_null, agree_null = divergence(a, sample(float_model, prompts, seed=cfg.seed + 1,
                                                  **draw))
    rows = []
    for variant, quant_model in quant_models.items():
        first, agree = divergence(a, sample(quant_model, prompts, seed=cfg.seed, **draw))
        forced = teacher_forced(float_model, quant_model, prompts, continuations,
                                max_context=max_context)
        mine = []
        for p in range(cfg.prompts):
            kl, kl_se = mean_se(forced["kl"][p].numpy())
            dnll, dnll_se = mean_se((forced["nll_quant"][p] - forced["nll_float"][p]).numpy())
            mine.append({"variant": variant, "prompt": p, "new_tokens": cfg.new_tokens,
                         "temperature": cfg.temperature, "first_divergence": first[p],
                         "agreement": agree[p], "first_divergence_null": first_null[p],
                         "agreement_null": agree_null[p], "kl": kl, "kl_se": kl_se,
                         "nll_float": float(forced["nll_float"][p].mean()),
                         "nll_quant": float(forced["nll_quant"][p].mean()),
                         "dnll": dnll, "dnll_se": dnll_se})
        rows += [*mine, summary(mine)]
    return rows


def summary(rows: list[dict]) -> dict:
    """Means over prompts; the SE columns become the SE over prompts of the per-prompt means
    (the positions within a prompt are not independent samples of the prompt population)."""
    out = {**rows[0], "prompt": "all"}
    for key in ("first_divergence", "agreement", "first_divergence_null", "agreement_null",
                "nll_float", "nll_quant"):
        out[key] = float(np.mean([row[key] for row in rows]))
    for key in ("kl", "dnll"):
        out[key], out[f"{key}_se"] = mean_se(np.array([row[key] for row in rows]))
    return out


def plot_generation(rows: list[dict], out: Path) -> None:
    """Per-prompt first divergence beside its null, and per-prompt KL with SE bars, per variant."""
    per_prompt = [row for row in rows if row["prompt"] != "all"]
    if not per_prompt:
        raise ValueError("plot_generation: no per-prompt rows")
    variants = list(dict.fromkeys(row["variant"] for row in per_prompt))
    width = 0.8 / len(variants)
    with figure(out, size=(11, 4), panels=2) as (ax_div, ax_kl):
        for i, variant in enumerate(variants):
            mine = [row for row in per_prompt if row["variant"] == variant]
            x = np.array([row["prompt"] for row in mine]) + (i - (len(variants) - 1) / 2) * width
            ax_div.bar(x, [row["first_divergence"] for row in mine], width, label=variant)
            ax_div.scatter(x, [row["first_divergence_null"] for row in mine], marker="x",
                           color="black", zorder=3, label="null (self, independent)" if i == 0
                           else None)
            ax_kl.errorbar(x, [row["kl"] for row in mine], yerr=[row["kl_se"] for row in mine],
                           fmt="o", capsize=3, label=variant)
        ax_div.axhline(per_prompt[0]["new_tokens"], color="grey", linestyle="--",
                       label="new_tokens (identical)")
        ax_div.set(xlabel="prompt", ylabel="first divergent step",
                   title=f"Shared-stream divergence (T={per_prompt[0]['temperature']})")
        ax_kl.set(xlabel="prompt", ylabel="KL(float || quant) [nats/token]",
                  title="Teacher-forced KL (± SE over positions)")
        for ax in (ax_div, ax_kl):
            ax.set_xticks(sorted({row["prompt"] for row in per_prompt}))
            ax.legend(fontsize=8)


def build_generation(model_path: Path, artifacts: dict[str, Path], shards: Path, table: Path,
                     plot: Path, *, cfg: GenerationConfig, seq_len: int,
                     provenance=None) -> list[dict]:
    """Float against each artifact on the first validation windows as prompts."""
    model = load_model(model_path).eval()
    length = cfg.prompt_tokens + cfg.new_tokens
    tokens, _ = val_windows(val_stream(shards), length, cfg.prompts)
    if len(tokens) < cfg.prompts:
        raise ValueError(f"{shards}: validation holds {len(tokens)} windows of {length} tokens, "
                         f"analysis.generation.prompts = {cfg.prompts}")
    tokens = torch.from_numpy(tokens).long()
    prompts, continuations = tokens[:, :cfg.prompt_tokens], tokens[:, cfg.prompt_tokens:]
    rows = compare(model, quantized_models(artifacts), prompts, continuations, cfg=cfg,
                   max_context=seq_len)
    plot_generation(rows, plot)
    rows = [{**row, "prompt": str(row["prompt"])} for row in rows]  # one parquet column type
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance)
    return rows

