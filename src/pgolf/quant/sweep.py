"""Sensitivity sweeps: dBPB when one matrix, or all matrices of a block group, are quantized.

Fast path: a matrix of physical layer i first acts at virtual position v (0 for the embedding).
Everything before v is unchanged, so the network state entering v is computed once per batch and
every bit width resumes from it; the float model's per-window NLL (the baseline) is computed once
per seed by its own stage and shared by every sweep job. The deltas equal those of full
evaluations (tests compare them). The noise floor beside each delta is the standard error of the
paired per-window differences: the sampling noise of dBPB on this finite subset of windows.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from pgolf.data.bytecount import byte_counter
from pgolf.data.scores import read_metadata, write_table
from pgolf.eval.bpb import val_stream, window_positions
from pgolf.eval.bpb import windows as val_windows
from pgolf.model.checkpoint import load_model
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import quantized_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, round_to_nearest, weighted_error
from pgolf.quant.lqer import LQERConfig, correct, section_bytes
from pgolf.train.distributed import pick_device


@dataclass(kw_only=True)
class SweepConfig:
    bits: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    group_bits: list[int] = field(default_factory=lambda: [6])  # the block-group sweep
    windows: int = 64  # validation windows of seq_len in the fixed sweep subset
    batch_seqs: int = 16
    bootstrap: int = 2000  # resamples of windows for the amplification factor's interval
    device: str = "auto"  # auto | cpu | cuda: the baseline and every sweep job must agree


@dataclass
class Subset:
    """The fixed sweep subset: batches of validation windows and the target bytes they hold."""
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    num_bytes: int

    @property
    def windows(self) -> int:
        return sum(len(x) for x, _ in self.batches)


def load_subset(shard_dir, tokenizer, vocab_size: int, *, windows: int, seq_len: int,
                batch_seqs: int, device: torch.device | str = "cpu") -> Subset:
    """The first `windows` validation windows, batched on `device`, and their byte count."""
    counter = byte_counter(shard_dir, tokenizer, vocab_size)
    x, y = val_windows(val_stream(shard_dir), seq_len, windows)
    batches = [(torch.from_numpy(x[i:i + batch_seqs]).to(device),
                torch.from_numpy(y[i:i + batch_seqs]).to(device))
               for i in range(0, len(x), batch_seqs)]
    num_bytes = counter.target_bytes(x, y, window_positions(0, len(x), seq_len)).sum()
    return Subset(batches, int(num_bytes))


def first_position(model: GPT, name: str) -> int:
    """The first virtual layer whose computation reads the matrix `name` (0 for embeddings)."""
    if not name.startswith("blocks."):
        return 0
    layer = int(name.split(".")[1])
    return model.cfg.layer_sequence(model.looping).index(layer)


@torch.no_grad()
def prefix_cache(model: GPT, subset: Subset, v: int) -> list:
    """Per batch: the network state entering virtual layer v (None at v = 0), inputs, targets."""
    return [(model.advance(model.initial_state(x), 0, v) if v else None, x, y)
            for x, y in subset.batches]


@torch.no_grad()
def window_nlls(model: GPT, cached: list, v: int) -> torch.Tensor:
    """Per-window NLL sums (nats, float64, on the CPU), resuming every batch at virtual position
    v. In fp32 even on a GPU: bf16 rounding would swamp the smallest deltas (int8: ~1e-5 BPB)."""
    depth = len(model.cfg.layer_sequence(model.looping))
    out = []
    for state, x, y in cached:
        # At v = 0 the embedding may be the changed matrix, so the start state is rebuilt.
        state = model.initial_state(x) if state is None else state
        logits = model.logits(model.output(model.advance(state, v, depth)))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                reduction="none")
        out.append(nll.view(y.shape).double().sum(dim=1))
    return torch.cat(out).cpu()


@contextmanager
@torch.no_grad()
def swapped(model: GPT, weights: dict[str, torch.Tensor]):
    """The model with some parameters replaced, restored on exit."""
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in weights}
    try:
        for name, w in weights.items():
            params[name].copy_(w.to(params[name].dtype))
        yield model
    finally:
        for name, w in originals.items():
            params[name].copy_(w)


def mean_and_se(diff: torch.Tensor) -> dict:
    """The mean of paired per-window differences and its standard error (the noise floor)."""
    return {"dbpb": float(diff.mean()), "noise_se": float(diff.std() / math.sqrt(len(diff)))}


def damage(nll: torch.Tensor, base: torch.Tensor, num_bytes: int) -> dict:
    """dBPB of per-window NLLs against the baseline, and the SE of the paired differences."""
    diff = (nll - base) / math.log(2) / num_bytes * len(base)  # mean(diff) is dBPB
    return {**mean_and_se(diff), "per_window": diff}


def sweep_matrix(model: GPT, name: str, H: torch.Tensor, subset: Subset, base: torch.Tensor, *,
                 cfg: SweepConfig, gptq: GPTQConfig, lqer: LQERConfig | None = None) -> list[dict]:
    """One row per bit width: dBPB, its noise floor, bytes, slope, clip, H-weighted errors. With
    LQER on, a second row per width with the correction at lqer.rank, and on every row its
    rank (0 = none) and ||W - W_hat||_F."""
    original = dict(model.named_parameters())[name].detach().clone()
    v = first_position(model, name)
    cached = prefix_cache(model, subset, v)
    rows = []
    for bits in cfg.bits:
        codes, scales, clip = gptq.search(original, H, bits, name)
        W_hat = dequantize(codes, scales)
        size = quantized_bytes(codes.cpu().numpy(), scales.cpu().numpy(), bits)
        rtn_error = weighted_error(original, dequantize(round_to_nearest(
            original, scales, bits=bits), scales), H)
        options = [(0, W_hat, size)]
        if lqer is not None and lqer.enabled:
            fix = correct(original, W_hat, lqer)
            options.append((lqer.rank, W_hat + fix.dequantize(), size + section_bytes(fix)))
        for rank, weights, nbytes in options:
            with swapped(model, {name: weights}):
                result = damage(window_nlls(model, cached, v), base, subset.num_bytes)
            row = {"matrix": name, "bits": bits, "dbpb": result["dbpb"],
                   "noise_se": result["noise_se"], "bytes": nbytes,
                   "slope_dbpb_per_kb": result["dbpb"] / (nbytes / 1000), "clip_sigmas": clip,
                   "weighted_error": weighted_error(original, weights, H),
                   "rtn_weighted_error": rtn_error, "params": original.numel(),
                   "first_position": v, "windows": len(base)}
            if lqer is not None and lqer.enabled:
                row |= {"lqer_rank": rank, "error_fro": float((original - weights).norm())}
            rows.append(row)
    return rows


def sweep_cost(model: GPT, names: list[str], bits: int = 5) -> float:
    """The fast path's cost as a fraction of the naive one (a full evaluation per matrix and bit
    width), counted in virtual layers run with the LM head as one more: per matrix, the prefix
    once and the suffix per bit width; the shared baseline is one full evaluation in all."""
    depth = len(model.cfg.layer_sequence(model.looping)) + 1
    positions = [first_position(model, n) for n in names]
    spent = sum(v + bits * (depth - v) for v in positions) + depth
    return spent / (bits * depth * len(names))


def block_groups(cfg: GPTConfig, looping: bool) -> list[dict]:
    """Physical layers in groups: the looped span as one group, the others in adjacent pairs
    (the record stack's loop span 4-5 makes this (0,1), (2,3), (4,5), (6,7), (8,9), (10))."""
    looped = cfg.looped_layers(looping)
    groups, current = [], []
    for layer in range(cfg.num_layers):
        if layer in looped:
            if current:
                groups.append(current)
            current = []
            if layer == cfg.loop_end:
                groups.append(sorted(looped))
            continue
        current.append(layer)
        if len(current) == 2:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [{"layers": g, "looped": bool(looped & set(g))} for g in groups]


def sweep_groups(model: GPT, hessians: dict, subset: Subset, base: torch.Tensor, *,
                 cfg: SweepConfig, gptq: GPTQConfig) -> tuple[list[dict], list[dict]]:
    """Rows per block group and bit width (all the group's matrices quantized together), and per
    bit width the loop amplification factor with its bootstrap interval."""
    params = dict(model.named_parameters())
    rows, diffs = [], {}
    for group in block_groups(model.cfg, model.looping):
        names = [n for n in hessians if n.startswith("blocks.")
                 and int(n.split(".")[1]) in group["layers"]]
        v = min(first_position(model, n) for n in names)
        cached = prefix_cache(model, subset, v)
        count = sum(params[n].numel() for n in names)
        for bits in cfg.group_bits:
            weights = {n: dequantize(*gptq.search(params[n].detach(), hessians[n], bits, n)[:2])
                       for n in names}
            with swapped(model, weights):
                result = damage(window_nlls(model, cached, v), base, subset.num_bytes)
            label = "-".join(map(str, group["layers"]))
            diffs[label, bits] = (result["per_window"], count, group["looped"])
            rows.append({"group": label, "layers": group["layers"], "looped": group["looped"],
                         "bits": bits, "params": count, "matrices": len(names),
                         "dbpb": result["dbpb"], "noise_se": result["noise_se"],
                         "dbpb_per_mparam": result["dbpb"] / count * 1e6,
                         "noise_se_per_mparam": result["noise_se"] / count * 1e6})
    return rows, [amplification(diffs, bits, cfg.bootstrap) for bits in cfg.group_bits]


def amplification(diffs: dict, bits: int, resamples: int) -> dict:
    """A = damage per parameter of the looped group / mean of the non-looped groups', with a 95%
    interval from resampling windows (paired: one draw of windows serves every group). A = 1 is
    the null: looping does not amplify quantization damage."""
    looped = [(d, n) for (_, b), (d, n, loop) in diffs.items() if b == bits and loop]
    plain = [(d, n) for (_, b), (d, n, loop) in diffs.items() if b == bits and not loop]
    if not looped or not plain:
        return {"bits": bits, "amplification": None,
                "why_none": "needs a looped group and a non-looped group"}

    def ratio(index) -> np.ndarray:
        def per_param(groups):
            return np.mean([d.numpy()[index].mean(axis=-1) / n for d, n in groups], axis=0)
        return per_param(looped) / per_param(plain)

    windows = len(looped[0][0])
    draws = np.random.default_rng(0).integers(0, windows, size=(resamples, windows))
    boot = ratio(draws)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return {"bits": bits, "amplification": float(ratio(np.arange(windows))),
            "ci95": [float(low), float(high)], "resamples": resamples}


DEFINITION = (
    "dbpb: change in bits per byte on a fixed subset of validation windows when only this "
    "matrix is GPTQ-quantized at `bits` (everything else float). noise_se: standard error of the "
    "paired per-window differences, the sampling noise of dbpb on this subset; deltas within "
    "about 2 noise_se of 0 are indistinguishable from no damage. bytes: the matrix's codes and "
    "scales as the artifact codec stores them alone. slope_dbpb_per_kb: dbpb per 1000 of those "
    "bytes. clip_sigmas: the SDClip k used (searched per tensor when gptq.clip_search is set).")
LQER_DEFINITION = (
    "lqer_rank: 0 for GPTQ alone; r for GPTQ plus its LQER correction of rank r (lqer.rank; "
    "factors quantized as lqer.a_bits / b_bits / group set), whose dbpb is measured with the "
    "corrected matrix and whose bytes add the correction's artifact section. error_fro: "
    "||W - W_hat||_F of the row's weights (the uniform policy's LQER top-k ranks by it at rank 0).")


def model_and_subset(model_path, shard_dir, tokenizer, *, windows: int, batch_seqs: int,
                     seq_len: int, device: torch.device | str = "cpu") -> tuple[GPT, Subset]:
    """The float model (eval mode) and the first `windows` validation windows, on `device`."""
    model = load_model(model_path, device).eval()
    subset = load_subset(shard_dir, tokenizer, model.cfg.vocab_size, windows=windows,
                         seq_len=seq_len, batch_seqs=batch_seqs, device=device)
    return model, subset


def open_model(model_path, shard_dir, tokenizer, *, cfg: SweepConfig,
               seq_len: int) -> tuple[GPT, Subset, str]:
    """The float model and the sweep subset on the device sweep.device names, and its kind."""
    device = pick_device(cfg.device, "sweep.device")
    model, subset = model_and_subset(model_path, shard_dir, tokenizer, windows=cfg.windows,
                                     batch_seqs=cfg.batch_seqs, seq_len=seq_len, device=device)
    return model, subset, device.type


def build_baseline(model_path, shard_dir, tokenizer, out, *, cfg: SweepConfig, seq_len: int,
                   provenance=None) -> torch.Tensor:
    """The float model's per-window NLL on the sweep subset: the baseline of every sweep job."""
    model, subset, device = open_model(model_path, shard_dir, tokenizer, cfg=cfg,
                                       seq_len=seq_len)
    nll = window_nlls(model, prefix_cache(model, subset, 0), 0)
    total = float(nll.sum())
    meta = {"bytes_scored": subset.num_bytes, "windows": len(nll), "seq_len": seq_len,
            "bpb": total / math.log(2) / subset.num_bytes, "device": device,
            "provenance": provenance.record() if provenance else None}
    write_table(pa.table({"window": np.arange(len(nll)), "nll_nats": nll.numpy()}), out, meta)
    return nll


def read_baseline(path, subset: Subset, device: str) -> torch.Tensor:
    """The baseline's per-window NLLs, refused unless they were scored on this subset on the same
    kind of device (a CPU-vs-GPU difference in the float NLLs would bias every delta)."""
    meta = read_metadata(path)
    if meta["windows"] != subset.windows or meta["bytes_scored"] != subset.num_bytes:
        raise ValueError(f"{path}: baseline of {meta['windows']} windows / "
                         f"{meta['bytes_scored']} bytes does not match the sweep subset "
                         f"({subset.windows} / {subset.num_bytes})")
    if meta.get("device", "cpu") != device:
        raise ValueError(f"{path}: baseline scored on {meta.get('device', 'cpu')}, but this sweep "
                         f"job runs on {device}: set sweep.device to one of them (the baseline "
                         "and the sweep jobs must run on the same kind of device)")
    return torch.tensor(pq.read_table(path)["nll_nats"].to_numpy())


def load_hessians(path, names=None, device: torch.device | str = "cpu") -> dict:
    """The Hessians of `names` (all when None): a sweep job reads only its own matrix's."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        stored = set(f.keys())
        return {n: f.get_tensor(n) for n in (stored if names is None else names) if n in stored}


def load_sweep_inputs(model_path, hessians_path, shard_dir, tokenizer, baseline, *,
                      cfg: SweepConfig, seq_len: int, names=None):
    model, subset, device = open_model(model_path, shard_dir, tokenizer, cfg=cfg,
                                       seq_len=seq_len)
    return (model, load_hessians(hessians_path, names, device), subset,
            read_baseline(baseline, subset, device))


def build_sweep(model_path, hessians_path, shard_dir, tokenizer, baseline, matrix: str, out, *,
                cfg: SweepConfig, gptq: GPTQConfig, seq_len: int,
                lqer: LQERConfig | None = None, provenance=None) -> list[dict]:
    """The sweep stage for one matrix: rows per bit width, parquet with the definition."""
    model, hessians, subset, base = load_sweep_inputs(
        model_path, hessians_path, shard_dir, tokenizer, baseline, cfg=cfg, seq_len=seq_len,
        names=[matrix])
    if matrix not in hessians:
        raise ValueError(f"{hessians_path}: no Hessian for {matrix}")
    on = lqer is not None and lqer.enabled
    if on:
        lqer.check_shapes({matrix: tuple(dict(model.named_parameters())[matrix].shape)})
    rows = sweep_matrix(model, matrix, hessians[matrix], subset, base, cfg=cfg, gptq=gptq,
                        lqer=lqer)
    meta = {"definition": DEFINITION + (" " + LQER_DEFINITION if on else ""),
            "bytes_scored": subset.num_bytes,
            "provenance": provenance.record() if provenance else None}
    write_table(pa.Table.from_pylist(rows), out, meta)
    return rows


GROUP_DEFINITION = (
    "Block-group sweep: every quantizable matrix of the group's blocks GPTQ-quantized at `bits` "
    "together, everything else float. dbpb_per_mparam: damage per million parameters. "
    "amplification (metadata): damage per parameter of the looped group over the mean of the "
    "non-looped groups', with a 95% interval from resampling windows; 1 is the null.")


def build_groups(model_path, hessians_path, shard_dir, tokenizer, baseline, out, *,
                 cfg: SweepConfig, gptq: GPTQConfig, seq_len: int, provenance=None) -> dict:
    """The block-group stage: rows per group and bit width, amplification in the metadata."""
    model, hessians, subset, base = load_sweep_inputs(
        model_path, hessians_path, shard_dir, tokenizer, baseline, cfg=cfg, seq_len=seq_len)
    rows, factors = sweep_groups(model, hessians, subset, base, cfg=cfg, gptq=gptq)
    meta = {"definition": GROUP_DEFINITION, "amplification": factors,
            "bytes_scored": subset.num_bytes,
            "provenance": provenance.record() if provenance else None}
    write_table(pa.Table.from_pylist(rows), out, meta)
    return {"rows": rows, "amplification": factors}
