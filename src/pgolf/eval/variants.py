"""Statistics across the variants of a grid: per variant mean BPB and seed SD, each variant against
the base paired over common seeds with Holm's step-down adjustment, a factorial summary when the
variants form a full 2^k design, and the greedy next step (`pgolf grid suggest`)."""

import itertools
import json
import math
from pathlib import Path

import numpy as np

from pgolf.eval.seeds import ORDER, finite, html_page
from pgolf.eval.stats import paired, spread
from pgolf.io import read_json, write_bytes, write_json
from pgolf.provenance import Provenance


def flatten(overlay: dict, prefix: str = "") -> dict:
    """A nested overlay as dotted keys: {"ttt": {"lr": 0.01}} -> {"ttt.lr": 0.01}."""
    flat = {}
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    """Dotted keys back to a nested overlay, the shape a config file takes."""
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def holm(pvalues: list) -> list:
    """Holm's step-down adjusted p-values: the i-th smallest of m is multiplied by m - i + 1, made
    monotone (a running maximum) and capped at 1. Undefined p-values (None, NaN) stay undefined
    and do not count in the family size m."""
    defined = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    m, out = len(defined), [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(defined, key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def compare(values: dict, reference: dict) -> dict:
    """values - reference paired over the seeds both have, or n/a with the reason."""
    common = sorted(set(values) & set(reference))
    if len(common) < 2:
        return {"n": len(common), "seeds": common,
                "na": f"{len(common)} common seed(s); a paired difference needs at least 2"}
    d = paired([values[s] for s in common], [reference[s] for s in common])
    return {**d, "seeds": common}


def variant_statistics(results: dict, overlays: dict, *, base: str = "base", mode: str = "",
                       policy: str = "") -> dict:
    """results = {variant: {seed: bpb}} for one mode and policy; overlays = {variant: overlay}."""
    if base not in results:
        raise ValueError(f"variants: no results for the base variant {base!r} "
                         f"(have {sorted(results)})")
    names = [base] + sorted(v for v in results if v != base)
    per_variant = {v: {"overlay": overlays.get(v, {}), "values": {str(s): b for s, b in
                                                                  sorted(results[v].items())},
                       **spread(list(results[v].values()))} for v in names}
    comparisons = [{"variant": v, "against": base, **compare(results[v], results[base])}
                   for v in names[1:]]
    adjusted = holm([c.get("p") for c in comparisons])
    m = sum(p is not None for p in adjusted)
    for c, p in zip(comparisons, adjusted, strict=True):
        c["p_holm"] = p
    base_sd = per_variant[base]["sd"]
    floor_se = [c["se"] for c in comparisons if "se" in c]
    return finite({
        "mode": mode, "policy": policy, "base": base, "variants": per_variant,
        "comparisons": comparisons,
        "multiple_comparisons": {"method": "Holm's step-down", "family_size": m},
        "noise_floor": {"base_seed_sd": base_sd,
                        "paired_se_median": float(np.median(floor_se)) if floor_se else None},
        "factorial": factorial(results, overlays, base=base)})


def design(overlays: dict, names: list, base: str):
    """Factors and each variant's ±1 levels of a full 2^k design, or the reason it is not one."""
    flat = {v: flatten(overlays.get(v, {})) for v in names}
    keys = sorted({k for f in flat.values() for k in f})
    low = {k: json.dumps(flat[base].get(k)) for k in keys}
    factors = [k for k in keys if len({json.dumps(flat[v].get(k)) for v in names}) > 1]
    for k in factors:
        levels = {json.dumps(flat[v].get(k)) for v in names}
        if len(levels) != 2:
            return None, None, f"not a 2^k design: factor {k} has {len(levels)} levels"
    if not factors:
        return None, None, "not a 2^k design: no overlay key differs across the variants"
    cells = {}
    for v in names:
        cell = tuple(-1 if json.dumps(flat[v].get(k)) == low[k] else 1 for k in factors)
        if cell in cells:
            return None, None, f"not a 2^k design: {cells[cell]} and {v} are the same combination"
        cells[cell] = v
    for cell in itertools.product((-1, 1), repeat=len(factors)):
        if cell not in cells:
            missing = ", ".join(k for k, x in zip(factors, cell, strict=True) if x > 0) or "none"
            return None, None, f"not a 2^k design: missing the combination with {missing} high"
    return factors, {v: c for c, v in cells.items()}, None


def factorial(results: dict, overlays: dict, *, base: str = "base") -> dict:
    """Main effects and interactions of a full 2^k design, computed within each seed (the ±1
    contrast / 2^(k-1)) and tested across seeds; otherwise the reason it is not one."""
    names = sorted(results)
    factors, cells, reason = design(overlays, names, base)
    if reason:
        return {"reason": reason}
    seeds = sorted(set.intersection(*(set(results[v]) for v in names)))
    k, effects = len(factors), []
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            per_seed = [sum(math.prod(cells[v][i] for i in subset) * results[v][s] for v in names)
                        / 2 ** (k - 1) for s in seeds]
            effect = {"effect": " x ".join(factors[i] for i in subset), "order": size,
                      "per_seed": per_seed, **spread(per_seed)} if seeds else {
                "effect": " x ".join(factors[i] for i in subset), "order": size, "n": 0}
            if len(seeds) > 1:
                effect.update({kk: vv for kk, vv in paired(per_seed, [0.0] * len(seeds)).items()
                               if kk not in ("n", "mean", "sd")})
            else:
                effect["na"] = f"{len(seeds)} seed(s) common to all cells; a test needs 2"
            effects.append(effect)
    return {"factors": factors, "k": k, "seeds": seeds, "effects": effects,
            "cells": {v: dict(zip(factors, cells[v], strict=True)) for v in names}}


def _num(value, digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _group_markdown(g: dict) -> list:
    base, fam = g["base"], g["multiple_comparisons"]
    lines = [f"## {g['policy']} / {g['mode']}", "",
             f"Noise floor: the base's seed-to-seed SD {_num(g['noise_floor']['base_seed_sd'])}; "
             f"the SE of a paired difference (median over variants) "
             f"{_num(g['noise_floor']['paired_se_median'])}.", "",
             "| variant | n | mean BPB | SD | diff vs base | SE | t | df | p | p Holm | 95% CI |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    v = g["variants"][base]
    lines.append(f"| {base} | {v['n']} | {_num(v['mean'])} | {_num(v['sd'])} | | | | | | | |")
    for c in g["comparisons"]:
        v = g["variants"][c["variant"]]
        head = f"| {c['variant']} | {v['n']} | {_num(v['mean'])} | {_num(v['sd'])} | "
        if "na" in c:
            lines.append(head + f"n/a: {c['na']} | | | | | | |")
            continue
        ci = c["ci95"]
        lines.append(head + f"{_num(c['mean'])} | {_num(c['se'])} | {_num(c['t'], 2)} | "
                     f"{c['df']} | {_p(c['p'])} | {_p(c['p_holm'])} | "
                     f"[{_num(ci[0])}, {_num(ci[1])}] |")
    lines += ["", f"Multiple comparisons: p Holm is Holm's step-down adjustment over the family "
              f"of m = {fam['family_size']} comparisons against {base}.", ""]
    fac = g["factorial"]
    if "reason" in fac:
        return lines + [f"Factorial summary: {fac['reason']}.", ""]
    lines += [f"Factorial summary (2^{fac['k']} design, effects within each of "
              f"{len(fac['seeds'])} common seed(s), ±1 contrast / 2^{fac['k'] - 1}):", "",
              "| effect | mean | SD | SE | t | p |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['effect']} | {_num(e.get('mean'))} | {_num(e.get('sd'))} | "
              f"{_num(e.get('se'))} | {_num(e.get('t'), 2)} | {_p(e.get('p'))} |"
              for e in fac["effects"]]
    return lines + [""]


def markdown(stats: dict) -> str:
    """The tables of every policy and mode, for humans."""
    lines = [f"# Variants against {stats['base']}", "",
             "Paired differences are variant - base over the seeds both have (t = mean / SE, "
             "exact two-sided p, t-based 95% CI).", ""]
    for g in stats["groups"]:
        lines += _group_markdown(g)
    return "\n".join(lines)


def parse_path(path: Path) -> tuple:
    """results/<run>/variants/<name>/seed<S>/eval/<policy>/<mode>.json -> (name, S, policy,
    mode)."""
    parts = Path(path).parts
    if len(parts) < 5 or parts[-3] != "eval" or not parts[-4].startswith("seed"):
        raise ValueError(f"{path}: expected variants/<name>/seed<S>/eval/<policy>/<mode>.json")
    return parts[-5], int(parts[-4][4:]), parts[-2], Path(parts[-1]).stem


def write_variant_statistics(eval_paths: list, overlays: dict, out: Path, table: Path, *,
                             base: str = "base", page: Path | None = None,
                             provenance: Provenance | None = None) -> dict:
    """The variants stage: every policy and mode found in the eval JSONs' paths."""
    grouped: dict = {}
    for path in eval_paths:
        name, seed, policy, mode = parse_path(path)
        grouped.setdefault((policy, mode), {}).setdefault(name, {})[seed] = read_json(path)["bpb"]
    rank = {m: i for i, m in enumerate(ORDER)}
    keys = sorted(grouped, key=lambda pm: (pm[0], rank.get(pm[1], len(ORDER)), pm[1]))
    stats = {"base": base, "groups": [variant_statistics(grouped[pm], overlays, base=base,
                                                         policy=pm[0], mode=pm[1])
                                      for pm in keys]}
    stats["provenance"] = provenance.record() if provenance else None
    write_json(out, stats)
    text = markdown(stats)
    write_bytes(table, text.encode())
    if page is not None:
        # html_page knows one heading level: each group's heading becomes one too
        write_bytes(page, html_page(text.replace("\n## ", "\n# ")).encode())
    return stats
