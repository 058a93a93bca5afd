"""Multi-seed statistics of the evaluation modes (seed-techniques A8): per seed and policy the BPB
of every mode with the artifact's bytes; across seeds the SD of each mode and paired differences
between modes and between policies; within a run TTT against sliding, paired over chunks."""

import html
import math
from pathlib import Path

import numpy as np

from pgolf.eval.stats import paired, spread
from pgolf.io import read_json, write_bytes, write_json
from pgolf.provenance import Provenance

ORDER = ("prequant", "roundtrip", "sliding", "ttt", "phased_ttt")


def finite(value):
    """Strict JSON: NaN and infinities (undefined or unbounded t with zero spread) become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mode_pairs(modes: list[str]) -> list[tuple[str, str]]:
    """Each mode against the one before it, and the last against prequant."""
    pairs = list(zip(modes, modes[1:], strict=False))
    if len(modes) > 2 and modes[0] == "prequant":
        pairs.append((modes[0], modes[-1]))
    return pairs


# quantization damage; the gains of TTT and of phased LoRA TTT
WITHIN_RUN = (("prequant", "roundtrip"), ("sliding", "ttt"), ("sliding", "phased_ttt"))


def chunk_paired(after: dict, before: dict) -> dict:
    """dBPB of two passes over the same chunks (roundtrip - prequant, ttt - sliding) and its
    noise floor: the SE of the sum of per-chunk differences, chunks taken as independent."""
    a, b = (np.asarray(r["chunks"]["nll_nats"]) for r in (after, before))
    if after["chunks"]["tokens"] != before["chunks"]["tokens"]:
        raise ValueError(f"{after['mode']} and {before['mode']} scored different chunks: rerun "
                         "both with the same eval and ttt.chunk_tokens settings")
    per_chunk = (a - b) / math.log(2) / before["bytes"]
    result = {"dbpb": float(per_chunk.sum()), "chunks": len(per_chunk)}
    if len(per_chunk) > 1:
        stats = paired(per_chunk * len(per_chunk), np.zeros(len(per_chunk)))
        result.update(se=stats["se"], t=stats["t"], p=stats["p"], ci95=stats["ci95"])
    return result


def seed_statistics(evals: dict, artifacts: dict, *, seeds: list, policies: list,
                    modes: list) -> dict:
    """evals[(seed, policy, mode)] and artifacts[(seed, policy)] are the stage JSONs."""
    modes = [m for m in ORDER if m in modes]
    rows = [{"seed": s, "policy": p, "artifact_bytes": artifacts[s, p]["artifact_bytes"],
             "total_bytes": artifacts[s, p]["total_bytes"],
             "margin_bytes": artifacts[s, p]["margin_bytes"],
             **{m: evals[s, p, m]["bpb"] for m in modes}} for s in seeds for p in policies]
    out = {"n": len(seeds), "seeds": seeds, "policies": policies, "modes": modes, "rows": rows,
           "across_seeds": {}, "paired_modes": {}, "paired_policies": [], "within_runs": []}
    for p in policies:
        mine = [r for r in rows if r["policy"] == p]
        out["across_seeds"][p] = {m: spread([r[m] for r in mine]) for m in modes}
        if len(seeds) > 1:
            out["paired_modes"][p] = [{"from": a, "to": b,
                                       **paired([r[b] for r in mine], [r[a] for r in mine])}
                                      for a, b in mode_pairs(modes)]
    if len(seeds) > 1:
        for a, b in zip(policies, policies[1:], strict=False):
            for m in modes:
                out["paired_policies"].append(
                    {"mode": m, "from": a, "to": b,
                     **paired([evals[s, b, m]["bpb"] for s in seeds],
                              [evals[s, a, m]["bpb"] for s in seeds])})
    out["within_runs"] = [{"seed": s, "policy": p, "from": a, "to": b,
                           **chunk_paired(evals[s, p, b], evals[s, p, a])}
                          for a, b in WITHIN_RUN if {a, b} <= set(modes)
                          for s in seeds for p in policies]
    return finite(out)


def _num(value, digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(stats: dict) -> str:
    """The headline table (per seed and policy) and the statistics, for humans."""
    modes, n = stats["modes"], stats["n"]
    head = "| seed | policy | " + " | ".join(modes) + " | artifact B | total B | margin B |"
    lines = [f"# Evaluation across {n} seed(s)", "", "BPB per mode; bytes from the artifact "
             "stage (total = artifact + code).", "", head,
             "|" + "---|" * (len(modes) + 5)]
    for r in stats["rows"]:
        lines.append(f"| {r['seed']} | {r['policy']} | "
                     + " | ".join(_num(r[m]) for m in modes)
                     + f" | {r['artifact_bytes']:,} | {r['total_bytes']:,} | "
                     f"{r['margin_bytes']:,} |")
    for p, per_mode in stats["across_seeds"].items():
        lines.append(f"| mean ± SD | {p} | "
                     + " | ".join(f"{_num(v['mean'])} ± {_num(v['sd'])}"
                                  for v in per_mode.values()) + " | | | |")
    if stats["paired_modes"] or stats["paired_policies"]:
        lines += ["", f"Paired differences across seeds (n = {n}, df = {n - 1}; t = mean / SE, "
                  "exact two-sided p, t-based 95% CI):", "",
                  "| within | difference | mean | SD | SE | t | p | 95% CI |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [(p, f"{d['to']} - {d['from']}", d) for p, ds in stats["paired_modes"].items()
                for d in ds]
        rows += [(d["mode"], f"{d['to']} - {d['from']}", d) for d in stats["paired_policies"]]
        for label, what, d in rows:
            ci = d["ci95"]
            lines.append(f"| {label} | {what} | {_num(d['mean'])} | {_num(d['sd'])} | "
                         f"{_num(d['se'])} | {_num(d['t'], 2)} | {_num(d['p'], 4)} | "
                         f"[{_num(ci[0])}, {_num(ci[1])}] |")
    if stats["within_runs"]:
        lines += ["", "Within each run, paired over chunks (quantization damage, TTT's gain; "
                  "noise floor: SE of the summed chunk differences):", "",
                  "| seed | policy | difference | dBPB | SE | chunks |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {d['seed']} | {d['policy']} | {d['to']} - {d['from']} | "
                  f"{_num(d['dbpb'])} | {_num(d.get('se'))} | {d['chunks']} |"
                  for d in stats["within_runs"]]
    return "\n".join(lines) + "\n"


def html_page(text: str) -> str:
    """The Markdown of `markdown()` (headings, paragraphs, pipe tables) as a standalone HTML page:
    the report shows HTML inline, Markdown only as a download."""
    body, table = [], []

    def flush():
        if table:
            cells = [[html.escape(c.strip()) for c in row.strip("|").split("|")] for row in table
                     if not set(row) <= set("|-")]
            head, *rows = cells
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                                  for r in rows) + "</table>")
            table.clear()
    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h2>{html.escape(line[2:])}</h2>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;font-size:14px} table{border-collapse:collapse;"
             "margin-bottom:1em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_seed_statistics(eval_paths: list[Path], artifact_paths: list[Path], out: Path,
                          table: Path, *, seeds: list, policies: list, modes: list,
                          page: Path | None = None,
                          provenance: Provenance | None = None) -> dict:
    """The seeds stage: read seed{S}/eval/{policy}/{mode}.json and seed{S}/artifact/{policy}.json
    (keys from their paths), write the statistics, the Markdown table and its HTML page."""
    def seed_of(path: Path) -> int:
        return int(next(p.name for p in path.parents if p.name.startswith("seed"))[4:])
    evals = {(seed_of(p), p.parent.name, p.stem): read_json(p) for p in eval_paths}
    artifacts = {(seed_of(p), p.stem): read_json(p) for p in artifact_paths}
    stats = seed_statistics(evals, artifacts, seeds=seeds, policies=policies, modes=modes)
    stats["provenance"] = provenance.record() if provenance else None
    write_json(out, stats)
    text = markdown(stats)
    write_bytes(table, text.encode())
    if page is not None:
        write_bytes(page, html_page(text).encode())
    return stats
