"""Quantization figures on a trained model: artifact bytes side by side, GPTQ time, sweep cost.

    python bench/quant_bytes.py [--run-dir results/demo/seed1] [--data-dir results/demo/data]
    python bench/quant_bytes.py --run-dir results/h100x1/seed42 --data-dir results/h100x1/data \
        --seq-len 2048 --device cuda                     # the record model, GPTQ and sweep on a GPU

Bytes (same GPTQ codes and scales, `uniform` allocation):
  pgolf     the packed artifact (each quantized tensor: context-modelled rANS over its codes and
            scales, see pgolf.quant.codec), split into codes, scales, fp16 group and header
  records   codes (int8), scales and float tensors (fp16) as raw bytes, stride-2 byte shuffle,
            brotli-11: the records' method without torch.save's pickle framing (which only adds)
  bound     sum over quantized tensors of the order-0 entropy of its codes (what a static code
            per tensor, without row references or contexts, needs at best) + pgolf's bytes for
            everything that is not codes (scales as the coder attributes them, fp16, header);
            pgolf / bound < 1 is what row references and contexts win over that
Goals printed: pgolf <= 0.97 x records and <= 1.01 x bound.
Sweep: seconds of the whole fast sweep (shared baseline, cached prefixes) vs the naive one (a full
evaluation per matrix and bit width) over every matrix, and the fast path's layer-count fraction.
"""

import argparse
import json
import time
from pathlib import Path

import brotli
import numpy as np
import torch
from safetensors.torch import load_file

from pgolf.model.checkpoint import load_model, read_header
from pgolf.model.config import GPTConfig
from pgolf.quant.allocate import uniform_bits
from pgolf.quant.artifact import Quantized, pack_artifact, quantized_bytes
from pgolf.quant.codec import entropy_bound_bytes, shuffle_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, qmax
from pgolf.quant.sweep import (
    SweepConfig,
    damage,
    load_subset,
    prefix_cache,
    swapped,
    sweep_cost,
    sweep_matrix,
    window_nlls,
)


def records_bytes(tensors: dict) -> int:
    parts = []
    for t in tensors.values():
        if isinstance(t, Quantized):
            parts += [t.codes.numpy().astype(np.int8).tobytes(), t.scales.numpy().tobytes()]
        else:
            parts.append(t.to(torch.float16).numpy().tobytes())
    return len(brotli.compress(shuffle_bytes(b"".join(parts), 2), quality=11))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def quantize_timed(state, hessians, bits, cfg, device):
    """GPTQ of every quantized tensor on `device`, each timed alone; the codes come back to the
    CPU for packing."""
    out, seconds = {}, {}
    for name, tensor in state.items():
        if name in bits:
            W, H = tensor.to(device), hessians[name].to(device)
            sync(device)
            start = time.perf_counter()
            codes, scales = cfg.quantize(W, H, bits[name], name=name)
            sync(device)
            seconds[name] = time.perf_counter() - start
            out[name] = Quantized(codes.cpu(), scales.cpu(), bits[name])
        else:
            out[name] = tensor
    return out, seconds


def byte_figures(tensors: dict) -> None:
    data, breakdown = pack_artifact(tensors, {})
    parts = [v for v in breakdown.values() if isinstance(v, dict) and "codes" in v]
    codes, scales = sum(v["codes"] for v in parts), sum(v["scales"] for v in parts)
    fp16 = breakdown.get("fp16 group", {}).get("bytes", 0)
    bound = sum(entropy_bound_bytes(t.codes.numpy().astype(np.int64) + qmax(t.bits))
                for t in tensors.values() if isinstance(t, Quantized))
    ours, theirs = len(data), records_bytes(tensors)
    print(f"pgolf artifact   {ours:10,d} B   = codes {codes:,d} + scales {scales:,d} + fp16 group "
          f"{fp16:,d} + header {breakdown['header']:,d}")
    print(f"records method   {theirs:10,d} B   pgolf / records = {ours / theirs:.4f} "
          "(goal <= 0.97)")
    print(f"order-0 bound    {ours - codes + bound:10,.0f} B   pgolf / bound   = "
          f"{ours / (ours - codes + bound):.4f} (goal <= 1.01; codes alone: {codes:,d} vs "
          f"{bound:,.0f})")


def sweep_figures(model, hessians, subset, names, gptq) -> None:
    """Both sweeps over every matrix, timed end to end (GPTQ and byte counts included in both;
    the NLLs come back to the CPU in both, so no device work is left untimed)."""
    cfg = SweepConfig()
    start = time.perf_counter()
    base = window_nlls(model, prefix_cache(model, subset, 0), 0)  # the shared baseline stage
    for name in names:
        sweep_matrix(model, name, hessians[name], subset, base, cfg=cfg, gptq=gptq)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    full = prefix_cache(model, subset, 0)
    base = window_nlls(model, full, 0)  # the naive sweep needs a baseline too
    evals = time.perf_counter() - start
    for name in names:
        original = dict(model.named_parameters())[name].detach()
        for bits in cfg.bits:  # the naive sweep: quantize, size, then a full evaluation
            codes, scales = gptq.quantize(original, hessians[name], bits, name=name)
            quantized_bytes(codes.cpu().numpy(), scales.cpu().numpy(), bits)
            tick = time.perf_counter()
            with swapped(model, {name: dequantize(codes, scales)}):
                damage(window_nlls(model, full, 0), base, subset.num_bytes)
            evals += time.perf_counter() - tick
    naive = time.perf_counter() - start
    print(f"sweep over all {len(names)} matrices x {len(cfg.bits)} widths, {subset.windows} "
          f"windows: fast {fast:.1f} s vs naive {naive:.1f} s = {fast / naive:.3f} (goal <= 0.5)")
    print(f"  vs the naive sweep's evaluations alone ({evals:.1f} s): {fast / evals:.3f}")
    print(f"  layer-count fraction of the fast path (its floor without batching): "
          f"{sweep_cost(model, names, len(cfg.bits)):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("results/demo/seed1"))
    parser.add_argument("--data-dir", type=Path, default=Path("results/demo/data"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32, help="sweep subset (the demo's)")
    parser.add_argument("--device", default="cpu", help="where GPTQ and the sweeps run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    state = load_file(str(args.run_dir / "model.safetensors"))
    hessians = load_file(str(args.run_dir / "hessians.safetensors"), device=str(device))
    cfg = GPTQConfig()
    model_cfg = GPTConfig(**json.loads(read_header(args.run_dir / "model.safetensors")["config"]))
    bits = uniform_bits(model_cfg, matrix_bits=6, embed_bits=8)
    tensors, seconds = quantize_timed(state, hessians, bits, cfg, device)
    print(f"GPTQ on {device}: {len(seconds)} matrices in {sum(seconds.values()):.2f} s "
          f"({sum(seconds.values()) / len(seconds) * 1000:.0f} ms per matrix, "
          f"max {max(seconds.values()) * 1000:.0f} ms)")
    byte_figures(tensors)
    model = load_model(args.run_dir / "model.safetensors", device).eval()
    subset = load_subset(args.data_dir / "shards", args.data_dir / "tokenizer.model",
                         model.cfg.vocab_size, windows=args.windows, seq_len=args.seq_len,
                         batch_seqs=16, device=device)
    sweep_figures(model, hessians, subset, list(bits), cfg)


if __name__ == "__main__":
    main()
