"""Bit allocation: bits (and SDClip k) per quantizable tensor for a named policy, with predictions.

`uniform` assigns bits by role, as the records do: int6 block matrices, int8 embedding. `rd` solves
a multiple-choice knapsack over the swept bit widths of every tensor: least predicted dBPB under a
byte budget, by exact dynamic programming over byte buckets (costs rounded up, so the choice
always fits). Both record what the sensitivity sweep predicts:
- bytes: each tensor's bytes packed alone (the sweep's `bytes`) plus the fixed bytes of everything
  else (header, float tensors, and what grouping saves): measured on the reference artifact when
  the budget is another policy's artifact, otherwise estimated by packing the float tensors with
  placeholder codes;
- dBPB: the sum of the matrices' swept deltas, each made non-increasing in bits and clipped at 0
  (deltas below the noise floor are noise, and more bits cannot cost accuracy). Additivity is the
  model's assumption; the evaluation stage scores the real artifact to check it.
With LQER measured (lqer.rank > 0), every swept width of a matrix is two options, GPTQ alone and
GPTQ plus its rank-r correction (bytes include the correction's section; its dBPB curve is made
monotone on its own): rd's knapsack picks among all of them, so a correction is paid for like any
bit width; uniform's lqer_top_k corrects the k tensors with the largest ||W - W_hat||_F at their
widths (the record: 3). "lqer" maps each corrected tensor to its rank.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from pgolf.io import write_json
from pgolf.model.checkpoint import read_config
from pgolf.model.config import GPTConfig, quantizable_matrices
from pgolf.provenance import Provenance
from pgolf.quant.artifact import Quantized, pack_artifact, quantized_bytes
from pgolf.quant.codebytes import CHALLENGE_BYTES

POLICIES = ("uniform", "rd")
MAX_BUCKETS = 1 << 20  # the DP's table is tensors x buckets int8: ~70 MB for the record model
# Held back from a reference artifact's budget: the compressed header lists each tensor's bits,
# so its size moves by some bytes with the allocation (21 B on the demo).
HEADER_SLACK = 64


Option = tuple[int, int]  # (bits, LQER rank; 0 = GPTQ alone)


@dataclass(kw_only=True)
class UniformConfig:
    matrix_bits: int = 6
    embed_bits: int = 8
    lqer_top_k: int = 0  # LQER on the k tensors of largest ||W - W_hat||_F (the record: 3)

    def __post_init__(self):
        if not isinstance(self.lqer_top_k, int) or self.lqer_top_k < 0:
            raise ValueError(f"allocate.uniform.lqer_top_k = {self.lqer_top_k!r}: must be an "
                             "integer >= 0")


@dataclass(kw_only=True)
class RDConfig:
    # Artifact bytes: an integer, "challenge" (the size limit minus code bytes) or
    # "policy:<name>" (the bytes of that policy's artifact, so a small model's budget binds).
    budget: int | str = "challenge"
    resolution_bytes: int = 0  # DP bucket size; 0 = the budget / 2^20, at least 1 byte

    def reference(self) -> str | None:
        """The policy whose artifact sets the budget, if any."""
        if isinstance(self.budget, str) and self.budget.startswith("policy:"):
            return self.budget.removeprefix("policy:")
        return None

    def __post_init__(self):
        if self.reference() == "rd":
            raise ValueError("allocate.rd.budget: 'policy:rd' would be rd's own artifact")
        if isinstance(self.budget, str) and self.budget != "challenge" and not self.reference():
            raise ValueError(f"allocate.rd.budget = {self.budget!r}: expected bytes, "
                             "'challenge' or 'policy:<name>'")


def uniform_bits(model: GPTConfig, *, matrix_bits: int, embed_bits: int) -> dict[str, int]:
    embeddings = {"tok_emb.weight", "lm_head.weight"}
    return {name: embed_bits if name in embeddings else matrix_bits
            for name, _ in quantizable_matrices(model)}


def damage_curves(rows: list[dict]) -> dict[str, dict[Option, dict]]:
    """Per matrix and option (bits, LQER rank): bytes, clip and the predicted dBPB, monotone
    non-increasing in bits within each rank and non-negative."""
    curves: dict = {}
    for r in rows:
        curves.setdefault(r["matrix"], {})[r["bits"], r.get("lqer_rank") or 0] = dict(r)
    for options in curves.values():
        for rank in sorted({rank for _, rank in options}):
            floor = 0.0
            for key in sorted((k for k in options if k[1] == rank), reverse=True):
                floor = max(floor, options[key]["dbpb"])
                options[key]["predicted_dbpb"] = floor
    return curves


def lqer_measured(curves: dict) -> bool:
    return any(rank for options in curves.values() for _, rank in options)


def _tensor_prediction(c: dict) -> dict:
    out = {"bits": c["bits"], "bytes": c["bytes"], "dbpb": c["predicted_dbpb"]}
    return out | ({"lqer_rank": c["lqer_rank"]} if c.get("lqer_rank") else {})


def predict(choice: dict[str, Option], curves: dict, fixed_bytes: int) -> dict | None:
    """Predicted bytes and dBPB of an allocation, or None when an option was not swept."""
    if any(o not in curves.get(n, {}) for n, o in choice.items()):
        return None
    chosen = {n: curves[n][o] for n, o in choice.items()}
    matrix_bytes = sum(c["bytes"] for c in chosen.values())
    return {"bytes": matrix_bytes + fixed_bytes, "matrix_bytes": matrix_bytes,
            "fixed_bytes": fixed_bytes,
            "dbpb": sum(c["predicted_dbpb"] for c in chosen.values()),
            "dbpb_noise_se": math.sqrt(sum(c["noise_se"] ** 2 for c in chosen.values())),
            "per_tensor": {n: _tensor_prediction(c) for n, c in chosen.items()}}


def lqer_top_k(choice: dict[str, Option], curves: dict, top_k: int) -> dict[str, Option]:
    """The record's LQER: a correction at the swept rank on the top_k tensors by ||W - W_hat||_F
    at their chosen widths (all of them when there are fewer)."""
    if not top_k:
        return choice
    ranks = sorted({rank for options in curves.values() for _, rank in options if rank})
    if not ranks:
        raise ValueError(f"allocate.uniform.lqer_top_k = {top_k}: the sweep measured no LQER "
                         "options (set lqer.rank > 0)")
    unswept = [f"{n} at int{o[0]}" for n, o in choice.items() if o not in curves[n]]
    if unswept:
        raise ValueError(f"allocate.uniform.lqer_top_k = {top_k}: {unswept[0]} was not swept "
                         "(add the width to sweep.bits)")
    errors = {n: curves[n][o]["error_fro"] for n, o in choice.items()}
    top = sorted(errors, key=lambda n: -errors[n])[:top_k]
    return {n: (o[0], ranks[-1]) if n in top else o for n, o in choice.items()}


def knapsack(costs: list[list[int]], damages: list[list[float]], budget: int) -> list[int] | None:
    """Per item, the index of its chosen option: least total damage with total cost <= budget
    (exact DP; ties go to the earlier, cheaper option). None when nothing fits."""
    best = np.zeros(budget + 1)  # best[j]: least damage of the items so far within cost j
    choice = np.empty((len(costs), budget + 1), dtype=np.int8)
    for i, (cost, dmg) in enumerate(zip(costs, damages, strict=True)):
        new, pick = np.full(budget + 1, np.inf), np.full(budget + 1, -1, dtype=np.int8)
        for k, (c, d) in enumerate(zip(cost, dmg, strict=True)):
            if c > budget:
                continue
            candidate = np.full(budget + 1, np.inf)
            candidate[c:] = best[:budget + 1 - c] + d
            better = candidate < new
            new[better], pick[better] = candidate[better], k
        best, choice[i] = new, pick
    if not np.isfinite(best[budget]):
        return None
    picks, j = [], budget
    for i in range(len(costs) - 1, -1, -1):
        k = int(choice[i, j])
        picks.append(k)
        j -= costs[i][k]
    return picks[::-1]


def rd_choice(curves: dict, matrix_budget: int, resolution: int) -> dict[str, Option]:
    """The knapsack over every swept option (widths, with and without LQER); costs round up to
    buckets so the result always fits."""
    if resolution <= 0:
        resolution = max(1, math.ceil(matrix_budget / MAX_BUCKETS))
    names = sorted(curves)
    options = [sorted(curves[n]) for n in names]
    costs = [[math.ceil(curves[n][o]["bytes"] / resolution) for o in opts]
             for n, opts in zip(names, options, strict=True)]
    damages = [[curves[n][o]["predicted_dbpb"] for o in opts]
               for n, opts in zip(names, options, strict=True)]
    picks = knapsack(costs, damages, matrix_budget // resolution)
    if picks is None:
        least = sum(min(c["bytes"] for c in curves[n].values()) for n in names)
        raise ValueError(f"allocate.rd: no allocation fits {matrix_budget:,} B for the quantized "
                         f"tensors; the fewest swept bits need {least:,} B")
    return {n: opts[k] for n, opts, k in zip(names, options, picks, strict=True)}


def allocation_choice(alloc: dict) -> dict[str, Option]:
    """The (bits, LQER rank) per tensor an allocation JSON records."""
    lqer = alloc.get("lqer", {})
    return {n: (int(b), int(lqer.get(n, 0))) for n, b in alloc["bits"].items()}


def placeholder_fixed_bytes(model_path: Path, bits: dict[str, int]) -> int:
    """Bytes outside the quantized tensors, estimated: pack the real float tensors with all-zero
    codes in place of every quantized tensor, and take away what those codes cost alone."""
    tensors = {}
    for name, t in load_file(str(model_path)).items():
        if name in bits:
            codes = np.zeros(t.shape, dtype=np.int8)
            scales = np.ones(t.shape[0], dtype=np.float16)
            tensors[name] = Quantized(torch.from_numpy(codes), torch.from_numpy(scales),
                                      bits[name])
        else:
            tensors[name] = t
    data, _ = pack_artifact(tensors, {})
    alone = sum(quantized_bytes(t.codes.numpy(), t.scales.numpy(), t.bits)
                for t in tensors.values() if isinstance(t, Quantized))
    return len(data) - alone


def budget_bytes(cfg: RDConfig, model_path: Path, curves: dict, reference: dict | None, *,
                 limit_bytes: int, code_bytes: int | None = None) -> dict:
    """The artifact bytes rd may spend and the fixed bytes outside the quantized tensors."""
    name = cfg.reference()
    if name:
        if not reference:
            raise ValueError(f"allocate.rd.budget = {cfg.budget!r} needs that policy's "
                             "allocation and artifact as inputs")
        alloc = json.loads(Path(reference["allocation"]).read_text())
        artifact = json.loads(Path(reference["artifact"]).read_text())
        own = predict(allocation_choice(alloc), curves, 0)
        if own is None:
            raise ValueError(f"allocate.rd.budget = {cfg.budget!r}: {reference['allocation']} "
                             "uses options the sweep did not measure (add its widths to "
                             "sweep.bits, or set lqer.rank as it was)")
        total = artifact["artifact_bytes"]
        return {"spec": cfg.budget, "bytes": total, "source": str(reference["artifact"]),
                "fixed_bytes": total - own["matrix_bytes"] + HEADER_SLACK,
                "fixed_from": f"reference artifact + {HEADER_SLACK} B header slack"}
    most = {n: max(b for b, _ in options) for n, options in curves.items()}
    fixed = placeholder_fixed_bytes(model_path, most)
    if cfg.budget == "challenge":
        if code_bytes is None:
            raise ValueError("allocate.rd.budget = 'challenge' needs the code bytes "
                             "(pgolf.quant.codebytes)")
        code = code_bytes
        total, source = limit_bytes - code, f"{limit_bytes:,} B limit - {code:,} B code"
    else:
        total, source = int(cfg.budget), "config"
    return {"spec": cfg.budget, "bytes": total, "source": source, "fixed_bytes": fixed,
            "fixed_from": "estimate (float tensors packed with placeholder codes)"}


def build_allocation(model_path: Path, sensitivity: Path, policy: str, out: Path, *,
                     cfg: UniformConfig | RDConfig, reference: dict | None = None,
                     limit_bytes: int = CHALLENGE_BYTES, code_bytes: int | None = None,
                     provenance: Provenance | None = None) -> dict:
    """The allocation stage: bits and clip per tensor, the budget, and the predictions."""
    model, _ = read_config(model_path)
    curves = damage_curves(pq.read_table(sensitivity).to_pylist())
    missing = sorted({n for n, _ in quantizable_matrices(model)} - set(curves))
    if missing:
        raise ValueError(f"{sensitivity}: no sweep rows for {missing[:5]}")
    if policy == "uniform":
        bits = uniform_bits(model, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits)
        choice = lqer_top_k({n: (b, 0) for n, b in bits.items()}, curves, cfg.lqer_top_k)
        budget, fixed = None, placeholder_fixed_bytes(model_path, bits)
    elif policy == "rd":
        budget = budget_bytes(cfg, model_path, curves, reference, limit_bytes=limit_bytes,
                              code_bytes=code_bytes)
        fixed = budget["fixed_bytes"]
        choice = rd_choice(curves, budget["bytes"] - fixed, cfg.resolution_bytes)
    else:
        raise ValueError(f"unknown allocation policy {policy!r}; available: {POLICIES}")
    clips = {n: curves[n][o]["clip_sigmas"] for n, o in choice.items() if o in curves[n]}
    summary = {"policy": policy, "bits": {n: b for n, (b, _) in choice.items()},
               "clip_sigmas": clips}
    if lqer_measured(curves):
        summary["lqer"] = {n: rank for n, (_, rank) in choice.items() if rank}
    summary |= {"budget": budget, "predicted": predict(choice, curves, fixed),
                "definition": __doc__,
                "provenance": provenance.record() if provenance else None}
    write_json(out, summary)
    return summary
