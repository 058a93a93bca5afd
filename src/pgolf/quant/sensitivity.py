"""Sensitivity aggregation: the sweep rows of a seed in one table, summaries by matrix type, layer
and loop membership (each with its propagated noise floor), the block-group amplification, plots.
"""

import math

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.data.scores import read_metadata, write_table
from pgolf.model.checkpoint import read_config
from pgolf.plot import figure
from pgolf.quant.sweep import DEFINITION

SUMMARY = (
    "Summaries at the middle swept bit width: mean slope_dbpb_per_kb over the matrices of a "
    "type, a layer, or loop membership; se = sqrt(sum noise_se^2) / n over the same matrices, "
    "converted to slope units: the noise floor of the mean. loop_ratio = mean slope of looped "
    "layers' matrices / non-looped ones' (se by the delta method; 1 is the null).")


def role(name: str) -> tuple[str, int | None]:
    """("attn.c_q", 3) for blocks.3.attn.c_q.weight; ("tok_emb", None) for tok_emb.weight."""
    parts = name.removesuffix(".weight").split(".")
    if parts[0] == "blocks":
        return ".".join(parts[2:]), int(parts[1])
    return ".".join(parts), None


def annotate(rows: list[dict], looped_layers: set[int]) -> list[dict]:
    out = []
    for row in rows:
        kind, layer = role(row["matrix"])
        out.append({**row, "type": kind, "layer": layer,
                    "looped": layer is not None and layer in looped_layers})
    return out


def mean_slope(rows: list[dict]) -> dict:
    n = len(rows)
    slope = sum(r["slope_dbpb_per_kb"] for r in rows) / n
    se = math.sqrt(sum((r["noise_se"] / (r["bytes"] / 1000)) ** 2 for r in rows)) / n
    return {"slope_dbpb_per_kb": slope, "se": se, "matrices": n}


def summarize(rows: list[dict], key: str) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return [{key: k, **mean_slope(v)} for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def loop_ratio(rows: list[dict]) -> dict | None:
    looped = [r for r in rows if r["looped"]]
    plain = [r for r in rows if not r["looped"] and r["layer"] is not None]
    if not looped or not plain:
        return None
    a, b = mean_slope(looped), mean_slope(plain)
    ratio = a["slope_dbpb_per_kb"] / b["slope_dbpb_per_kb"]
    se = abs(ratio) * math.hypot(a["se"] / a["slope_dbpb_per_kb"], b["se"] / b["slope_dbpb_per_kb"])
    return {"ratio": ratio, "se": se}


def aggregate_sensitivity(paths: list, groups_path, model_path, out, plot_out, groups_plot_out,
                          *, provenance=None) -> pa.Table:
    """The stage: one table with type/layer/loop columns, summaries in its metadata, two plots."""
    cfg, looping = read_config(model_path)
    rows = annotate(pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist(),
                    cfg.looped_layers(looping))
    bits = sorted({r["bits"] for r in rows})
    # GPTQ-alone rows only: LQER rows (lqer.rank > 0) would count a matrix twice
    mid = [r for r in rows if r["bits"] == bits[len(bits) // 2] and not r.get("lqer_rank")]
    groups = pq.read_table(groups_path).to_pylist()
    summary = {"bits": mid[0]["bits"], "by_type": summarize(mid, "type"),
               "by_layer": summarize([r for r in mid if r["layer"] is not None], "layer"),
               "by_loop": summarize([r for r in mid if r["layer"] is not None], "looped"),
               "loop_ratio": loop_ratio(mid),
               "amplification": read_metadata(groups_path)["amplification"]}
    table = pa.Table.from_pylist(rows)
    write_table(table, out, {"definition": DEFINITION, "summary_definition": SUMMARY,
                             "summary": summary,
                             "provenance": provenance.record() if provenance else None})
    plot_slopes(mid, plot_out)
    plot_groups(summary, groups, groups_plot_out)
    return table


def plot_slopes(rows: list[dict], out) -> None:
    chosen = sorted(rows, key=lambda r: -r["slope_dbpb_per_kb"])
    with figure(out, size=(8, max(3, 0.22 * len(chosen)))) as ax:
        ax.barh([r["matrix"] for r in chosen], [r["slope_dbpb_per_kb"] for r in chosen],
                xerr=[2 * r["noise_se"] / (r["bytes"] / 1000) for r in chosen],
                color=["#c44e52" if r["looped"] else "#4c72b0" for r in chosen],
                ecolor="#555555")
        ax.invert_yaxis()
        ax.set(xlabel=f"dBPB per KB at int{rows[0]['bits']} (red: looped layers; error bars: "
                      "2 x noise SE)", title="Per-matrix quantization damage per byte")


def plot_groups(summary: dict, groups: list[dict], out) -> None:
    panels = [("by_type", "type"), ("by_layer", "layer"), ("by_loop", "looped")]
    with figure(out, size=(16, 4), panels=4) as axes:
        for ax, (key, label) in zip(axes, panels, strict=False):
            items = summary[key]
            ax.bar([str(i[label]) for i in items], [i["slope_dbpb_per_kb"] for i in items],
                   yerr=[2 * i["se"] for i in items], color="#4c72b0", ecolor="#555555")
            ax.set(title=f"mean slope by {label}", ylabel="dBPB per KB")
            ax.tick_params(axis="x", labelrotation=45)
        bits = summary["amplification"][0]["bits"] if summary["amplification"] else None
        chosen = [g for g in groups if g["bits"] == bits]
        axes[3].bar([g["group"] for g in chosen], [g["dbpb_per_mparam"] for g in chosen],
                    yerr=[2 * g["noise_se_per_mparam"] for g in chosen],
                    color=["#c44e52" if g["looped"] else "#4c72b0" for g in chosen])
        axes[3].set(title=f"block groups at int{bits} (red: looped)",
                    ylabel="dBPB per million parameters")
