"""Ablation grid: named config variants and per-stage keys, so variants share unchanged stages."""

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pgolf.config import merge, validate_config

BASE = "base"
# A variant changes what runs, never the run's name or the seeds every variant runs with.
RESERVED = ("run", "seeds", "variants")


def variant_configs(config: dict, *, files: Sequence[str | Path] = ()) -> dict[str, dict]:
    """`base` (the config without `variants`) and each variant's effective config: its overlay
    merged over the base config (pgolf.config.merge), validated and default-filled.

    A variant that sets run, seeds or variants, fails the schema, or equals another's effective
    config (base's included) is a ValueError naming it.
    """
    overlays = config.get("variants") or {}
    base = copy.deepcopy(config)
    base.pop("variants", None)
    configs = {BASE: validate_config(copy.deepcopy(base), files=files)}
    for name, overlay in overlays.items():
        if name == BASE:
            raise ValueError(f"variants.{BASE}: the name {BASE!r} is the base config's")
        if not isinstance(overlay, dict):
            raise ValueError(f"variants.{name} = {overlay!r}: must be a config overlay (a mapping)")
        for key in RESERVED:
            if key in overlay:
                raise ValueError(f"variants.{name}.{key} = {overlay[key]!r}: a variant cannot "
                                 f"set {key} (it applies to the whole grid)")
        effective = merge(copy.deepcopy(base), copy.deepcopy(overlay))
        try:
            configs[name] = validate_config(effective, files=files)
        except ValueError as err:
            raise ValueError(f"variants.{name}: {err}") from None
    _check_distinct(configs)
    return configs


def _check_distinct(configs: dict[str, dict]) -> None:
    seen: dict[str, str] = {}
    for name, effective in configs.items():
        text = json.dumps(effective, sort_keys=True)
        if text in seen:
            raise ValueError(f"variants.{name}: the same effective config as {seen[text]!r} "
                             "(the grid would run it twice)")
        seen[text] = name


@dataclasses.dataclass(frozen=True)
class Stage:
    rule: str | None  # the rule in rules/*.smk; None for a value a rule's params carry
    reads: tuple[str, ...] = ()  # config slices: "section" or "section.key"
    upstream: tuple[str, ...] = ()  # stages whose outputs it takes as inputs


# THIS TABLE MUST FOLLOW rules/*.smk and the spec helpers in rules/common.smk (params only; code
# hashes aside): a slice a rule reads that is missing here would let two variants share an output
# they should not (tests/test_grid.py checks the literal config[...] params of every rule).
# {policy} expands over allocate.policies and {mode} over eval.modes; an entry named with
# {policy} binds its upstream {policy} to its own, other entries take every policy.
EVAL = ("eval.batch_seqs", "eval.max_tokens", "eval.device", "eval.nproc", "eval.autocast",
        "eval.compile", "eval.seq_len", "train.seq_len",
        "ttt.chunk_tokens")  # every mode sums per TTT chunk, so any two modes pair
DATA = ("shards", "tokenizer")
STAGES = {
    "corpus": Stage("corpus", ("corpus",)),
    "hub_shards": Stage("hub_shards", ("corpus.hf", "tokenizer.vocab_size")),
    # BPE trains on the training documents only: val_docs says which ones are held out
    "tokenizer": Stage("tokenizer", ("tokenizer", "shards.val_docs"), ("corpus", "hub_shards")),
    "shards": Stage("shards", ("shards", "tokenizer.caseops"),
                    ("corpus", "hub_shards", "tokenizer")),
    "window_scores": Stage("window_scores", ("scores", "train.seq_len"), DATA),
    "curriculum": Stage("curriculum", ("manifest",), ("window_scores",)),
    # train_spec: the model with the tokenizer's vocab_size, and the whole train section
    "train": Stage("train", ("model", "tokenizer.vocab_size", "train"), (*DATA, "curriculum")),
    "hessians": Stage("hessians", ("hessian", "train.seq_len"), ("train", "shards")),
    "sweep_baseline": Stage("sweep_baseline", ("sweep.windows", "sweep.batch_seqs",
                                               "sweep.device", "train.seq_len"),
                            ("train", *DATA)),
    "sweep": Stage("sweep", ("sweep.bits", "sweep.windows", "sweep.batch_seqs", "sweep.device",
                             "gptq", "lqer", "train.seq_len"),
                   ("train", "hessians", "sweep_baseline", *DATA)),
    "block_groups": Stage("block_groups", ("sweep.group_bits", "sweep.bootstrap",
                                           "sweep.windows", "sweep.batch_seqs", "sweep.device",
                                           "gptq", "train.seq_len"),
                          ("train", "hessians", "sweep_baseline", *DATA)),
    # joins one sweep per matrix: the matrix names come from the model (train's key)
    "sensitivity": Stage("sensitivity", (), ("sweep", "block_groups", "train")),
    # allocate_params: the policy's own slice; rd adds its budget's inputs (_extra)
    "allocate:uniform": Stage("allocate", ("allocate.uniform",), ("train", "sensitivity")),
    "allocate:rd": Stage("allocate", ("allocate.rd",), ("train", "sensitivity")),
    # not a rule: the exported train_gpt.py's size (CODE in common.smk), read by artifact and by
    # rd under budget 'challenge'; keyed by export_spec's slices unless the value is given
    "code_bytes": Stage(None, ("model", "tokenizer.vocab_size", "train", "scores", "manifest",
                               "hessian", "gptq", "pack", "lqer", "eval", "ttt", "lora_ttt",
                               "submission", "run", "seeds")),
    "artifact:{policy}": Stage("artifact", ("gptq", "pack", "lqer"),
                               ("train", "hessians", "allocate:{policy}", "code_bytes")),
    # one job writes every policy's file: its key does not depend on the policy
    "eval:{policy}:prequant": Stage("eval_prequant", EVAL, ("train", *DATA)),
    "eval:{policy}:roundtrip": Stage("eval", (*EVAL, "eval.guard"),
                                     ("artifact:{policy}", "train", "eval:{policy}:prequant",
                                      *DATA)),
    "eval:{policy}:sliding": Stage("eval", (*EVAL, "eval.stride"),
                                   ("artifact:{policy}", "eval:{policy}:roundtrip", *DATA)),
    "eval:{policy}:ttt": Stage("eval", (*EVAL, "eval.stride", "ttt"),
                               ("artifact:{policy}", "eval:{policy}:roundtrip", *DATA)),
    "eval:{policy}:phased_ttt": Stage("eval", (*EVAL, "lora_ttt"),
                                      ("artifact:{policy}", "eval:{policy}:roundtrip", *DATA)),
    "seeds": Stage("seeds", ("seeds", "allocate.policies", "eval.modes"),
                   ("eval:{policy}:{mode}", "artifact:{policy}")),
    # submission_settings and export_spec: the chosen seeds, policy and mode
    "submission": Stage("submission", ("submission", "seeds", "allocate.policies", "eval.modes",
                                       "run"),
                        ("eval:{policy}:{mode}", "artifact:{policy}", "allocate:{policy}",
                         "train", "code_bytes")),
    "loss_curves": Stage("loss_curves", ("seeds",), ("train",)),
    "allocation_plots": Stage("allocation_plots", ("allocate.policies",),
                              ("allocate:{policy}", "artifact:{policy}")),
    "analysis_outliers": Stage("analysis_outliers", ("analysis.outliers",), ("train",)),
    "analysis_procrustes": Stage("analysis_procrustes", ("analysis.procrustes",), ("train",)),
    "analysis_procrustes_seeds": Stage("analysis_procrustes_seeds",
                                       ("seeds", "analysis.procrustes"), ("train",)),
    "analysis_skips": Stage("analysis_skips", ("analysis.windows", "analysis.batch_seqs",
                                               "train.seq_len"), ("train", *DATA)),
    "analysis_loops": Stage("analysis_loops", ("allocate.policies", "analysis.windows",
                                               "analysis.batch_seqs", "analysis.loops",
                                               "train.seq_len"),
                            ("train", "artifact:{policy}", *DATA)),
    "analysis_generation": Stage("analysis_generation", ("allocate.policies",
                                                         "analysis.generation", "train.seq_len"),
                                 ("train", "artifact:{policy}", "shards")),
    "analysis_damage": Stage("analysis_damage", ("allocate.policies",),
                             ("allocate:{policy}", "eval:{policy}:prequant",
                              "eval:{policy}:roundtrip", "sensitivity")),
}


def stage_keys(config: dict, *, code_bytes: dict | None = None) -> dict[str, str]:
    """Each stage's key (12 hex digits): a hash of the config slices it reads and its upstream
    stages' keys, so a change upstream changes every key downstream. Stages named per policy
    (`artifact:rd`) or per policy and mode (`eval:rd:ttt`) get one key each, for the configured
    policies and modes; a key exists for every stage, whether or not this config's DAG runs it.

    `config` is one effective config (variant_configs). `code_bytes`, the CODE value the rules
    pass (common.smk's export_code_bytes()), keys `code_bytes` by the bytes themselves; without
    it by the slices the exported program freezes in (a change there may change its size).
    """
    keys: dict[str, str] = {}
    policies, modes = config["allocate"]["policies"], config["eval"]["modes"]
    # allocate's policies have an entry each: only the configured ones
    names = [name for name in STAGES if "{policy}" not in name
             and _template(name)[1] in (None, *policies)]
    names += [name.format(policy=p) for name in STAGES if "{policy}" in name
              and name.split(":")[-1] in ("{policy}", *modes) for p in policies]
    for name in names:
        _key(name, config=config, keys=keys, code_bytes=code_bytes)
    return keys


def _key(name: str, *, config: dict, keys: dict, code_bytes: dict | None) -> str:
    if name in keys:
        return keys[name]
    template, policy = _template(name)
    stage = STAGES[template]
    reads, upstream = _extra(name, config=config, stage=stage)
    if name == "code_bytes" and code_bytes is not None:
        reads, payload = (), {"bytes": code_bytes}
    else:
        payload = {}
    payload["reads"] = {read: _slice(config, read) for read in reads}
    names = _expand(upstream, policy=policy, config=config)
    payload["upstream"] = {up: _key(up, config=config, keys=keys, code_bytes=code_bytes)
                           for up in names}
    text = json.dumps(payload, sort_keys=True, default=str)
    keys[name] = hashlib.sha256(text.encode()).hexdigest()[:12]
    return keys[name]


def _template(name: str) -> tuple[str, str | None]:
    """The table entry of a stage name and the policy it binds (`eval:rd:ttt` -> rd)."""
    parts = name.split(":")
    if len(parts) < 2:
        return name, None
    template = ":".join([parts[0], "{policy}", *parts[2:]])
    return (name if name in STAGES else template), parts[1]


def _extra(name: str, *, config: dict, stage: Stage) -> tuple[tuple, tuple]:
    """rd's budget: 'challenge' reads pack.limit_bytes and the code bytes (allocate_params),
    'policy:<name>' that policy's allocation and artifact (allocate_inputs)."""
    reads, upstream = stage.reads, stage.upstream
    if name == "allocate:rd":
        budget = str(config["allocate"]["rd"]["budget"])
        if budget == "challenge":
            reads, upstream = (*reads, "pack.limit_bytes"), (*upstream, "code_bytes")
        elif budget.startswith("policy:"):
            reference = budget.removeprefix("policy:")
            upstream = (*upstream, f"allocate:{reference}", f"artifact:{reference}")
    return reads, upstream


def _expand(names: Sequence[str], *, policy: str | None, config: dict) -> list[str]:
    policies = [policy] if policy else config["allocate"]["policies"]
    out = []
    for name in names:
        for p in policies if "{policy}" in name else [None]:
            modes = config["eval"]["modes"] if "{mode}" in name else [None]
            out += [name.format(policy=p, mode=m) for m in modes]
    return list(dict.fromkeys(out))


def _slice(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def shared_stages(configs: dict[str, dict], *,
                  code_bytes: dict[str, dict] | None = None) -> dict[str, dict[str, list[str]]]:
    """{stage: {key: [variant names]}}: the variants under one key share that stage's outputs
    (one job per seed). `code_bytes` maps a variant to its CODE value (see stage_keys)."""
    shared: dict[str, dict[str, list[str]]] = {}
    for variant, config in configs.items():
        value = (code_bytes or {}).get(variant)
        for stage, key in stage_keys(config, code_bytes=value).items():
            shared.setdefault(stage, {}).setdefault(key, []).append(variant)
    return shared
