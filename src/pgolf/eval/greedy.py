"""Greedy forward selection over a finished grid (`pgolf grid suggest`): the best variant so far,
whether its gain is significant after Holm, and the next one-at-a-time overlays on top of it."""

import json

import yaml

from pgolf.eval.seeds import ORDER
from pgolf.eval.variants import compare, flatten, unflatten


def candidates_from(spec) -> list:
    """candidates.yaml as flat overlays: a list of mappings (`- {ttt.lr: 0.01}`, each one
    candidate) or a mapping key -> list of values (one candidate per value)."""
    if isinstance(spec, dict) and spec:
        return [{k: v} for k, values in spec.items()
                for v in (values if isinstance(values, list) else [values])]
    if isinstance(spec, list) and spec and all(isinstance(c, dict) and c for c in spec):
        return [flatten(c) for c in spec]
    raise ValueError(f"candidates: {spec!r}: expected a list of key/value mappings or a mapping "
                     "key -> list of values")


def pick_group(stats: dict, *, policy: str | None, mode: str | None) -> dict:
    """The policy/mode group to select on: as given, else the last mode in ORDER (the headline
    score) of the first policy."""
    groups = [g for g in stats["groups"] if policy in (None, g["policy"])
              and mode in (None, g["mode"])]
    if not groups:
        have = sorted(f"{g['policy']}/{g['mode']}" for g in stats["groups"])
        raise ValueError(f"grid suggest: no results for policy {policy!r}, mode {mode!r} "
                         f"(have {have})")
    rank = {m: i for i, m in enumerate(ORDER)}
    return max(groups, key=lambda g: (g["policy"] == groups[0]["policy"],
                                      rank.get(g["mode"], -1)))


def label(flat: dict) -> str:
    return ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in flat.items())


def _significance(group: dict, best: str) -> str:
    """Best against the current accepted set: the largest other variant whose overlay the best's
    contains (the base if none), paired over common seeds; Holm's adjustment over the grid's
    family, or for a parent other than the base its first (most stringent) step, p x m."""
    variants, base = group["variants"], group["base"]
    mine = flatten(variants[best]["overlay"]).items()
    parents = [v for v in variants if v != best and flatten(variants[v]["overlay"]).items() <= mine]
    parent = max(parents, key=lambda v: len(flatten(variants[v]["overlay"])), default=base)
    m = group["multiple_comparisons"]["family_size"]
    if parent == base:
        c = next(c for c in group["comparisons"] if c["variant"] == best)
        p_adj, how = c.get("p_holm"), f"Holm's step-down, m = {m}"
    else:
        def values(v):
            return {int(s): b for s, b in variants[v]["values"].items()}
        c = compare(values(best), values(parent))
        p_adj = min(1.0, c["p"] * max(m, 1)) if c.get("p") is not None else None
        how = f"Holm's first step p x m, m = {m}"
    if "na" in c:
        return f"gain over {parent}: n/a ({c['na']})"
    verdict = "significant" if p_adj is not None and p_adj < 0.05 and c["mean"] < 0 else \
        "not significant"
    return (f"gain over {parent}: {c['mean']:+.5f} BPB (SE {c['se']:.5f}, p {c['p']:.4g}, "
            f"adjusted p {p_adj:.4g} by {how}): {verdict} at 0.05")


def suggest(stats: dict, candidates: list, *, policy: str | None = None,
            mode: str | None = None, base_config: dict | None = None) -> tuple[str, dict]:
    """The report lines (as YAML comments) and the next overlays, name -> nested overlay."""
    group = pick_group(stats, policy=policy, mode=mode)
    variants = group["variants"]
    best = min((v for v in variants if variants[v].get("mean") is not None),
               key=lambda v: variants[v]["mean"])
    lines = [f"# greedy step on {group['policy']}/{group['mode']}: best {best} "
             f"(mean BPB {variants[best]['mean']:.5f}, n = {variants[best]['n']})"]
    if best != group["base"]:
        lines.append(f"# {_significance(group, best)}")
    flat_best = flatten(variants[best]["overlay"])
    tried = {json.dumps(sorted(flatten(v["overlay"]).items()), default=str): name
             for name, v in variants.items()}
    base_flat = flatten(base_config) if base_config is not None else None
    overlays = {}
    for cand in candidates:
        if base_flat is not None:
            unknown = [k for k in cand if k not in base_flat]
            if unknown:
                raise ValueError(f"candidates: {unknown[0]} = {cand[unknown[0]]!r}: not a key of "
                                 "the base config")
        merged = {**flat_best, **cand}
        key = json.dumps(sorted(merged.items()), default=str)
        if cand.items() <= flat_best.items():
            lines.append(f"# skipped {label(cand)}: already in {best}")
        elif key in tried:
            lines.append(f"# skipped {label(cand)}: already run as {tried[key]}")
        elif base_flat is not None and all(k not in flat_best and base_flat.get(k) == v
                                           for k, v in cand.items()):
            lines.append(f"# skipped {label(cand)}: the base config's value")
        else:
            name = f"{best}+{label(cand)}"
            replaced = {k: flat_best[k] for k in cand if k in flat_best}
            if replaced:  # forward selection may revisit a chosen key's value
                lines.append(f"# {name} replaces {label(replaced)}")
            overlays[name] = unflatten(merged)
    return "\n".join(lines), overlays


def render(comment: str, overlays: dict) -> str:
    """The report and the overlays as YAML, ready to paste under `variants:`."""
    body = yaml.safe_dump(overlays, sort_keys=False, default_flow_style=False) if overlays \
        else "# no untried candidates left\n"
    return f"{comment}\n{body}"
