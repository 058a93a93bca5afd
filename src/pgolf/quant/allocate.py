"""Bit allocation: how many bits each quantizable tensor gets, per named policy.

`uniform` assigns bits by role, as the records do: int6 block matrices, int8 embedding. The `rd`
policy (a knapsack over the sensitivity sweep) needs the sweep stage and is not built yet.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.config import section
from pgolf.io import write_json
from pgolf.model.checkpoint import read_header
from pgolf.model.gpt import GPTConfig, quantizable_matrices
from pgolf.provenance import Provenance

POLICIES = ("uniform",)


@dataclass(kw_only=True)
class AllocateConfig:
    policies: list[str] = field(default_factory=lambda: ["uniform"])
    matrix_bits: int = 6
    embed_bits: int = 8

    def __post_init__(self):
        unknown = sorted(set(self.policies) - set(POLICIES))
        if unknown:
            raise ValueError(f"allocate.policies: unknown {unknown}; available: {POLICIES}")


def uniform_bits(model: GPTConfig, *, matrix_bits: int, embed_bits: int) -> dict[str, int]:
    embeddings = {"tok_emb.weight", "lm_head.weight"}
    return {name: embed_bits if name in embeddings else matrix_bits
            for name, _ in quantizable_matrices(model)}


def build_allocation(model_path: Path, policy: str, out: Path, *, cfg: AllocateConfig,
                     provenance: Provenance | None = None) -> dict:
    model = section(GPTConfig, json.loads(read_header(model_path)["config"]), "model")
    if policy not in cfg.policies:
        raise ValueError(f"allocation policy {policy!r} is not in allocate.policies "
                         f"{cfg.policies}")
    bits = uniform_bits(model, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits)
    summary = {"policy": policy, "bits": bits,
               "predicted": None,  # bytes and dBPB predictions come with the sensitivity sweep
               "provenance": provenance.record() if provenance else None}
    write_json(out, summary)
    return summary
