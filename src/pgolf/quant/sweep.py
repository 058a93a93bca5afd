"""Per-matrix sensitivity: dBPB when only one matrix is quantized (GPTQ, each bit width).

Fast path: a matrix of physical layer i first acts at virtual position v (0 for the embedding).
Everything before v is unchanged, so the network state entering v is computed once per batch and
every bit width resumes from it. The deltas equal those of full evaluations (tests compare them).
The noise floor beside each delta is the standard error of the paired per-window differences:
the sampling noise of dBPB on this finite subset of validation windows.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from pgolf.data.scores import write_table
from pgolf.data.tokenizer import ByteLUT, load_tokenizer, target_bytes
from pgolf.eval.bpb import val_stream
from pgolf.eval.bpb import windows as val_windows
from pgolf.model.checkpoint import load_model
from pgolf.model.gpt import GPT, State, rms_norm
from pgolf.plot import figure
from pgolf.quant.artifact import encode_codes
from pgolf.quant.codec import compress_best, shuffle_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, round_to_nearest, weighted_error


@dataclass(kw_only=True)
class SweepConfig:
    bits: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    windows: int = 64  # validation windows of seq_len in the fixed sweep subset
    batch_seqs: int = 16


def first_position(model: GPT, name: str) -> int:
    """The first virtual layer whose computation reads the matrix `name` (0 for embeddings)."""
    if not name.startswith("blocks."):
        return 0
    layer = int(name.split(".")[1])
    return model.cfg.layer_sequence(model.looping).index(layer)


@torch.no_grad()
def window_nll(model: GPT, state: State, start: int, y: torch.Tensor) -> torch.Tensor:
    """Per-window NLL sums (nats) resuming the network at virtual position `start`."""
    depth = len(model.cfg.layer_sequence(model.looping))
    logits = model.logits(rms_norm(model.advance(state, start, depth).x))
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return nll.view(y.shape).double().sum(dim=1)


@torch.no_grad()
def sweep_matrix(model: GPT, name: str, H: torch.Tensor, batches: list, *, cfg: SweepConfig,
                 gptq: GPTQConfig, num_bytes: int) -> list[dict]:
    """One row per bit width: dBPB, its noise floor, compressed bytes, slope, H-weighted error."""
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    v = first_position(model, name)
    cached = [(model.advance(model.initial_state(x), 0, v) if v else None, x, y)
              for x, y in batches]

    def per_window() -> torch.Tensor:
        # An embedding change reaches the start state too, so it is recomputed from scratch.
        return torch.cat([window_nll(model, s if s is not None else model.initial_state(x), v, y)
                          for s, x, y in cached])

    base = per_window()
    rows = []
    for bits in cfg.bits:
        codes, scales = gptq.quantize(original, H, bits)
        param.copy_(dequantize(codes, scales).to(param.dtype))
        diff = (per_window() - base) / math.log(2) / num_bytes * len(base)
        param.copy_(original)
        size = len(encode_codes(codes.numpy(), bits)[1]) + len(compress_best(
            shuffle_bytes(scales.numpy().tobytes(), 2))[1])
        dbpb = float(diff.mean())
        rtn = round_to_nearest(original, scales, bits=bits)
        rows.append({"matrix": name, "bits": bits, "dbpb": dbpb,
                     "noise_se": float(diff.std(unbiased=True) / math.sqrt(len(diff))),
                     "bytes": size, "slope_dbpb_per_kb": dbpb / (size / 1000),
                     "weighted_error": weighted_error(original, dequantize(codes, scales), H),
                     "rtn_weighted_error": weighted_error(original, dequantize(rtn, scales), H),
                     "first_position": v, "windows": len(base)})
    return rows


def sweep_cost(model: GPT, names: list[str]) -> float:
    """Fraction of the naive cost (a full evaluation per matrix and bit width) the fast path
    spends, counted in virtual layers run, with the LM head as one more layer."""
    depth = len(model.cfg.layer_sequence(model.looping)) + 1
    spent = [depth if first_position(model, n) == 0 else depth - first_position(model, n)
             for n in names]
    return float(np.mean(spent)) / depth


DEFINITION = (
    "dbpb: change in bits per byte on a fixed subset of validation windows when only this "
    "matrix is GPTQ-quantized at `bits` (everything else float). noise_se: standard error of the "
    "paired per-window differences, the sampling noise of dbpb on this subset; deltas within "
    "about 2 noise_se of 0 are indistinguishable from no damage. bytes: the matrix's codes and "
    "scales as the artifact would store them. slope_dbpb_per_kb: dbpb per 1000 of those bytes.")


def sweep_batches(shard_dir, lut, *, windows: int, seq_len: int, batch_seqs: int):
    """The fixed sweep subset: the first `windows` validation windows, and their byte count."""
    x, y = val_windows(val_stream(shard_dir), seq_len, windows)
    num_bytes = int(target_bytes(x, y, lut).sum())
    batches = [(torch.from_numpy(x[i:i + batch_seqs]), torch.from_numpy(y[i:i + batch_seqs]))
               for i in range(0, len(x), batch_seqs)]
    return batches, num_bytes


def build_sweep(model_path, hessians_path, shard_dir, tokenizer, matrix: str, out, *,
                cfg: SweepConfig, gptq: GPTQConfig, seq_len: int, provenance=None) -> list[dict]:
    """The sweep stage for one matrix: rows per bit width, parquet with the definition."""
    model = load_model(model_path).eval()
    hessians = load_file(str(hessians_path))
    if matrix not in hessians:
        raise ValueError(f"{hessians_path}: no Hessian for {matrix}")
    lut = ByteLUT.from_tokenizer(load_tokenizer(tokenizer), model.cfg.vocab_size)
    batches, num_bytes = sweep_batches(shard_dir, lut, windows=cfg.windows, seq_len=seq_len,
                                       batch_seqs=cfg.batch_seqs)
    rows = sweep_matrix(model, matrix, hessians[matrix], batches, cfg=cfg, gptq=gptq,
                        num_bytes=num_bytes)
    meta = {"definition": DEFINITION, "bytes_scored": num_bytes,
            "provenance": provenance.record() if provenance else None}
    write_table(pa.Table.from_pylist(rows), out, meta)
    return rows


def aggregate_sensitivity(paths: list, out, plot_out, *, provenance=None) -> pa.Table:
    """All matrices' rows in one table, and a plot of slopes with their noise floors."""
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    write_table(table, out, {"definition": DEFINITION,
                             "provenance": provenance.record() if provenance else None})
    plot_slopes(table.to_pylist(), plot_out)
    return table


def plot_slopes(rows: list[dict], out) -> None:
    bits = sorted({r["bits"] for r in rows})
    mid = bits[len(bits) // 2]
    chosen = sorted((r for r in rows if r["bits"] == mid), key=lambda r: -r["dbpb"])
    with figure(out, size=(8, max(3, 0.22 * len(chosen)))) as ax:
        ax.barh([r["matrix"] for r in chosen], [r["dbpb"] for r in chosen],
                xerr=[2 * r["noise_se"] for r in chosen], color="#4c72b0", ecolor="#c44e52")
        ax.invert_yaxis()
        ax.set(xlabel=f"dBPB at int{mid} (error bars: 2 x noise SE)",
               title="Per-matrix quantization damage")
