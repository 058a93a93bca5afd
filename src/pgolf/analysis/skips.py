"""U-Net skips (seed-techniques C5): gates, weights against their initialisation, the encoder's
effective share of the stream, and the dBPB of ablating each skip.

Decoder position j pops the newest encoder output s and mixes it into the stream x as
lerp(w_j * s, x, g_j) = g_j x + (1 - g_j) w_j s with g_j = sigmoid(gate_j): g is the decoder
stream's weight. A skip's weight norm alone is confounded by its initial value (all ones, norm
sqrt(d)): a large norm can mean the skip moved least, so the distance from the initialisation is
reported beside it, with the values of a freshly initialised model of the same config.
"""

import math
from pathlib import Path

import torch

from pgolf.analysis.table import write_analysis
from pgolf.analysis.windows import WindowsConfig, model_subset
from pgolf.model.gpt import GPT
from pgolf.plot import figure
from pgolf.quant.sweep import Subset, damage, prefix_cache, swapped, window_nlls

DEFINITION = (
    "Per U-Net skip j (decoder position j reads the newest encoder output s): gate_* are the mean, "
    "SD, min and max over channels of g = sigmoid(skip_gates[j]), the decoder stream's weight in "
    "lerp(w s, x, g) (1 - g is the encoder's); weight_norm = ||w_j||_2; distance_from_init = "
    "||w_j - w_init||_2; encoder_share = mean over tokens of ||(1 - g) w s|| / ||x_after||, the "
    "skip's share of the stream it writes (without gates: ||w s|| / ||x + w s||); ablation_dbpb = "
    "BPB with the skip removed (g := 1, or w := 0 without gates) minus the intact model's, on the "
    "analysis windows.")
NULL = (
    "The untrained initialisation: init_norm and init_gate_mean are the same statistics of a "
    "freshly initialised model of this config (weights all ones, gates 0 so g = 0.5), and "
    "distance_from_init is 0 there. ablation_noise_se is the standard error of the paired "
    "per-window differences: an ablation within about 2 noise_se of 0 is no measurable effect.")


def skip_pairs(model: GPT) -> list[tuple[int, int]]:
    """(encoder position, decoder position) of each skip, in virtual layers: the stack is LIFO."""
    encoder, decoder = model.cfg.split(model.looping)
    count = 0 if model.skip_weights is None else min(len(model.skip_weights), len(encoder),
                                                     len(decoder))
    return [(len(encoder) - 1 - j, len(encoder) + j) for j in range(count)]


def gate_values(model: GPT) -> torch.Tensor:
    """g per skip and channel: the decoder stream's weight (1 without gates: x + w s)."""
    if model.skip_gates is None:
        return torch.ones_like(model.skip_weights)
    return torch.sigmoid(model.skip_gates.detach().double())


@torch.no_grad()
def skip_parameters(model: GPT) -> list[dict]:
    """Gate statistics, weight norms and their distance from a fresh initialisation, per skip."""
    init = GPT(model.cfg)
    sequence = model.cfg.layer_sequence(model.looping)
    rows = []
    for j, (enc, dec) in enumerate(skip_pairs(model)):
        g, g0 = gate_values(model)[j], gate_values(init)[j]
        w, w0 = model.skip_weights[j].double(), init.skip_weights[j].double()
        rows.append({"skip": j, "encoder_position": enc, "encoder_layer": sequence[enc],
                     "decoder_position": dec, "decoder_layer": sequence[dec],
                     "gate_mean": float(g.mean()), "gate_sd": float(g.std()),
                     "gate_min": float(g.min()), "gate_max": float(g.max()),
                     "init_gate_mean": float(g0.mean()), "weight_norm": float(w.norm()),
                     "init_norm": float(w0.norm()), "distance_from_init": float((w - w0).norm())})
    return rows


@torch.no_grad()
def encoder_shares(model: GPT, batches: list[torch.Tensor]) -> torch.Tensor:
    """Per skip, the mean over tokens of the encoder term's norm over the mixed stream's."""
    pairs = skip_pairs(model)
    g = gate_values(model).float()
    sums, tokens = torch.zeros(len(pairs), dtype=torch.float64), 0
    for x in batches:
        state = model.advance(model.initial_state(x), 0, pairs[0][1]) if pairs else None
        for j, (_, dec) in enumerate(pairs):
            skip = model.skip_weights[j] * state.stack[-1]
            encoder_term = (1 - g[j]) * skip
            mixed = torch.lerp(skip, state.x, g[j]) if model.skip_gates is not None \
                else state.x + skip
            sums[j] += (encoder_term.norm(dim=-1) / mixed.norm(dim=-1)).double().sum()
            state = model.advance(state, dec, dec + 1)
        tokens += x.numel()
    return sums / max(tokens, 1)


def ablations(model: GPT, subset: Subset) -> list[dict]:
    """dBPB and its noise floor with each skip removed in turn."""
    cached = prefix_cache(model, subset, 0)
    base = window_nlls(model, cached, 0)
    rows = []
    for j, _ in enumerate(skip_pairs(model)):
        if model.skip_gates is not None:  # g = 1 keeps the decoder stream exactly
            gates = model.skip_gates.detach().clone()
            gates[j] = math.inf
            change = {"skip_gates": gates}
        else:
            weights = model.skip_weights.detach().clone()
            weights[j] = 0.0
            change = {"skip_weights": weights}
        with swapped(model, change):
            result = damage(window_nlls(model, cached, 0), base, subset.num_bytes)
        rows.append({"ablation_dbpb": result["dbpb"], "ablation_noise_se": result["noise_se"]})
    return rows


def skip_rows(model: GPT, subset: Subset) -> list[dict]:
    """Every statistic of every skip, one row each."""
    if model.skip_weights is None:
        raise ValueError("the model has no U-Net skips (model.skips: false): nothing to analyse")
    shares = encoder_shares(model, [x for x, _ in subset.batches])
    rows = []
    for row, share, ablation in zip(skip_parameters(model), shares, ablations(model, subset),
                                    strict=True):
        moved = row["distance_from_init"]
        note = "at its initial value (distance from init 0)" if moved == 0 else \
            f"moved {moved:.3g} from init (norm {row['weight_norm']:.3g} vs {row['init_norm']:.3g})"
        rows.append({**row, "encoder_share": float(share), **ablation,
                     "windows": subset.windows, "note": note})
    return rows


def plot_skips(rows: list[dict], out: Path) -> None:
    """Gate range, weight norm against its init, and ablation dBPB with 2-SE bars, per skip."""
    skips = [r["skip"] for r in rows]
    with figure(out, size=(12, 3.6), panels=3) as (gates, norms, ablate):
        gates.errorbar(skips, [r["gate_mean"] for r in rows],
                       yerr=[[r["gate_mean"] - r["gate_min"] for r in rows],
                             [r["gate_max"] - r["gate_mean"] for r in rows]], fmt="o", capsize=3)
        gates.axhline(rows[0]["init_gate_mean"], color="grey", ls="--", label="init")
        gates.set(xlabel="skip", ylabel="sigmoid(gate): mean, min-max", title="gates")
        gates.legend()
        norms.bar(skips, [r["weight_norm"] for r in rows], color="tab:blue", label="||w||")
        norms.bar(skips, [r["distance_from_init"] for r in rows], color="tab:orange", width=0.4,
                  label="||w - w_init||")
        norms.axhline(rows[0]["init_norm"], color="grey", ls="--", label="init norm")
        norms.set(xlabel="skip", title="skip weights")
        norms.legend()
        ablate.errorbar(skips, [r["ablation_dbpb"] for r in rows],
                        yerr=[2 * r["ablation_noise_se"] for r in rows], fmt="o", capsize=3)
        ablate.axhline(0, color="grey", lw=0.8)
        ablate.set(xlabel="skip", ylabel="dBPB (2 SE bars)", title="ablation: skip removed")
        for ax in (gates, norms, ablate):
            ax.set_xticks(skips)


def build_skips(model_path: Path, shards: Path, tokenizer: Path, table: Path, plot: Path, *,
                cfg: WindowsConfig, seq_len: int, provenance=None) -> list[dict]:
    model, subset = model_subset(model_path, shards, tokenizer, cfg=cfg, seq_len=seq_len)
    rows = skip_rows(model, subset)
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance,
                   bytes_scored=subset.num_bytes)
    plot_skips(rows, plot)
    return rows
