"""Quantization figures on a trained model: artifact bytes side by side, GPTQ time, sweep cost.

    python bench/quant_bytes.py [--run-dir results/demo/seed1] [--tokenizer ...] [--shards ...]

Bytes (same GPTQ codes and scales, `uniform` allocation):
  pgolf     the packed artifact (per-section best of rANS / bit-packed / int8 codecs)
  records   codes (int8), scales and float tensors (fp16) as raw bytes, stride-2 byte shuffle,
            brotli-11: the records' method without torch.save's pickle framing (which only adds)
  bound     order-0 entropy of the codes + pgolf's bytes for everything that is not codes
Sweep: seconds of the cached fast path vs a full evaluation per bit width, for a few matrices, and
the layer-count fraction over all matrices.
"""

import argparse
import json
import time
from pathlib import Path

import brotli
import numpy as np
import torch
from safetensors.torch import load_file

from pgolf.data.tokenizer import ByteLUT, load_tokenizer
from pgolf.model.checkpoint import load_model, read_header
from pgolf.model.config import GPTConfig
from pgolf.quant.allocate import uniform_bits
from pgolf.quant.artifact import Quantized, encode_codes, pack_artifact
from pgolf.quant.codec import entropy_bound_bytes, shuffle_bytes
from pgolf.quant.gptq import GPTQConfig, qmax
from pgolf.quant.sweep import SweepConfig, sweep_batches, sweep_cost, sweep_matrix


def records_bytes(tensors: dict) -> int:
    parts = []
    for t in tensors.values():
        if isinstance(t, Quantized):
            parts += [t.codes.numpy().astype(np.int8).tobytes(), t.scales.numpy().tobytes()]
        else:
            parts.append(t.to(torch.float16).numpy().tobytes())
    return len(brotli.compress(shuffle_bytes(b"".join(parts), 2), quality=11))


def quantize_timed(state, hessians, bits, cfg):
    out, seconds = {}, {}
    for name, tensor in state.items():
        if name in bits:
            start = time.perf_counter()
            codes, scales = cfg.quantize(tensor, hessians[name], bits[name])
            seconds[name] = time.perf_counter() - start
            out[name] = Quantized(codes, scales, bits[name])
        else:
            out[name] = tensor
    return out, seconds


def byte_figures(tensors: dict) -> None:
    data, breakdown = pack_artifact(tensors, {})
    codes = sum(v["codes"] for v in breakdown.values() if isinstance(v, dict) and "codes" in v)
    bound = sum(entropy_bound_bytes(t.codes.numpy().astype(np.int64) + qmax(t.bits))
                for t in tensors.values() if isinstance(t, Quantized))
    ours, theirs = len(data), records_bytes(tensors)
    print(f"pgolf artifact   {ours:10,d} B")
    print(f"records method   {theirs:10,d} B   pgolf / records = {ours / theirs:.4f}")
    print(f"order-0 bound    {ours - codes + bound:10,.0f} B   pgolf / bound   = "
          f"{ours / (ours - codes + bound):.4f}   (codes alone: {codes:,d} vs {bound:,.0f})")


def sweep_figures(model, hessians, batches, num_bytes, names, gptq) -> None:
    cfg = SweepConfig()
    fast = naive = 0.0
    for name in names:
        start = time.perf_counter()
        sweep_matrix(model, name, hessians[name], batches, cfg=cfg, gptq=gptq, num_bytes=num_bytes)
        fast += time.perf_counter() - start
        start = time.perf_counter()
        param = dict(model.named_parameters())[name]
        original = param.detach().clone()
        with torch.no_grad():
            for bits in cfg.bits:  # the naive sweep: quantize, size, then a full evaluation
                codes, scales = gptq.quantize(original, hessians[name], bits)
                encode_codes(codes.numpy(), bits)  # the same byte count the fast path makes
                param.copy_(codes.float() * scales.float()[:, None])
                sum(float(model(x, y, reduction="none").sum()) for x, y in batches)
            param.copy_(original)
        naive += time.perf_counter() - start
    print(f"sweep, measured on {len(names)} matrices: fast {fast:.1f} s vs naive {naive:.1f} s "
          f"= {fast / naive:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("results/demo/seed1"))
    parser.add_argument("--data-dir", type=Path, default=Path("results/demo/data"))
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    state = load_file(str(args.run_dir / "model.safetensors"))
    hessians = load_file(str(args.run_dir / "hessians.safetensors"))
    cfg = GPTQConfig()
    model_cfg = GPTConfig(**json.loads(read_header(args.run_dir / "model.safetensors")["config"]))
    bits = uniform_bits(model_cfg, matrix_bits=6, embed_bits=8)
    tensors, seconds = quantize_timed(state, hessians, bits, cfg)
    print(f"GPTQ: {len(seconds)} matrices in {sum(seconds.values()):.2f} s "
          f"({sum(seconds.values()) / len(seconds) * 1000:.0f} ms per matrix, "
          f"max {max(seconds.values()) * 1000:.0f} ms)")
    byte_figures(tensors)
    model = load_model(args.run_dir / "model.safetensors").eval()
    lut = ByteLUT.from_tokenizer(load_tokenizer(args.data_dir / "tokenizer.model"))
    batches, num_bytes = sweep_batches(args.data_dir / "shards", lut, windows=64,
                                       seq_len=args.seq_len, batch_seqs=16)
    layers = [n for n in bits if n.startswith("blocks.")]
    sample = [layers[0], layers[len(layers) // 2], layers[-1], "tok_emb.weight"]
    sweep_figures(model, hessians, batches, num_bytes, sample, cfg)
    print(f"sweep, layer-count fraction over all {len(bits)} matrices: "
          f"{sweep_cost(model, list(bits)):.3f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
