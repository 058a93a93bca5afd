"""Quantization damage, predicted against measured, per allocation (seed-techniques C2, C7).

The allocation predicts the artifact's dBPB as the sum of the matrices' isolated sweep deltas
(non-increasing in bits, clipped at 0). The evaluation measures the joint damage of the real
artifact: roundtrip minus prequant on the same chunks. Isolated deltas need not add up, so their
ratio is the check of the allocation's additivity assumption.
"""

import math
from pathlib import Path

import pyarrow.parquet as pq

from pgolf.analysis.table import write_analysis
from pgolf.eval.seeds import chunk_paired
from pgolf.io import read_json
from pgolf.plot import figure

DEFINITION = (
    "Per allocation policy: predicted_dbpb is the allocation's prediction (the sum over tensors "
    "of the sweep's dBPB at the allocated bits, made non-increasing in bits and clipped at 0); "
    "predicted_raw the plain sum of the swept deltas at those bits; measured_dbpb the artifact's "
    "roundtrip BPB minus the float model's prequant BPB on the same evaluation targets. The "
    "prediction comes from the sweep subset, the measurement from the evaluation targets.")
NULL = (
    "predicted_se: the sweep's noise floor of the prediction (per-tensor noise SEs added in "
    "quadrature); measured_se: the SE of the paired per-chunk differences (chunks taken as "
    "independent). A measured value within about 2 SE of the prediction agrees with additivity.")


def raw_prediction(sensitivity: Path, bits: dict[str, int], lqer: dict | None = None) -> float:
    """The plain sum of the sweep's deltas at the allocated bits (and LQER ranks, if any)."""
    rows = pq.read_table(sensitivity).to_pylist()
    swept = {(r["matrix"], r["bits"], r.get("lqer_rank") or 0): r["dbpb"] for r in rows}
    chosen = [(name, b, (lqer or {}).get(name, 0)) for name, b in bits.items()]
    missing = [f"{name}@{b}" for name, b, rank in chosen if (name, b, rank) not in swept]
    if missing:
        raise ValueError(f"{sensitivity}: no sweep row for {', '.join(missing[:5])}")
    return float(sum(swept[key] for key in chosen))


def damage_row(policy: str, allocation: Path, prequant: Path, roundtrip: Path,
               sensitivity: Path) -> dict:
    """One policy's prediction beside its measurement."""
    alloc = read_json(allocation)
    predicted = alloc["predicted"]
    measured = chunk_paired(read_json(roundtrip), read_json(prequant))
    se = measured.get("se", math.nan)
    return {"policy": policy, "predicted_dbpb": predicted["dbpb"],
            "predicted_se": predicted["dbpb_noise_se"],
            "predicted_raw": raw_prediction(sensitivity, alloc["bits"], alloc.get("lqer")),
            "measured_dbpb": measured["dbpb"], "measured_se": se, "chunks": measured["chunks"],
            "ratio": measured["dbpb"] / predicted["dbpb"] if predicted["dbpb"] else math.nan,
            "z": (measured["dbpb"] - predicted["dbpb"])
            / math.hypot(se, predicted["dbpb_noise_se"])}


def plot_damage(rows: list[dict], out: Path) -> None:
    """Measured against predicted dBPB with 2-SE bars on both, and the line of agreement."""
    with figure(out, size=(5, 4.5)) as ax:
        for r in rows:
            ax.errorbar(r["predicted_dbpb"], r["measured_dbpb"], xerr=2 * r["predicted_se"],
                        yerr=2 * r["measured_se"], fmt="o", capsize=3, label=r["policy"])
        top = max(max(r["predicted_dbpb"], r["measured_dbpb"]) for r in rows) * 1.3
        ax.plot([0, top], [0, top], color="grey", ls="--", label="measured = predicted")
        ax.set(xlabel="predicted dBPB (sum of sweep deltas)", ylabel="measured dBPB (roundtrip - "
               "prequant)", title="quantization damage")
        ax.legend()


def build_damage(runs: dict[str, dict[str, Path]], sensitivity: Path, table: Path, plot: Path,
                 *, provenance=None) -> list[dict]:
    """runs: per policy its allocation, prequant and roundtrip files."""
    rows = [damage_row(policy, files["allocation"], files["prequant"], files["roundtrip"],
                       sensitivity)
            for policy, files in runs.items()]
    write_analysis(rows, table, definition=DEFINITION, null=NULL, provenance=provenance)
    plot_damage(rows, plot)
    return rows

