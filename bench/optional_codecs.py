"""Optional weight codecs on a trained model: freeze-dry and 2:4 sparsity against plain GPTQ.

    python bench/optional_codecs.py [--run-dir results/demo/seed1] [--data-dir results/demo/data]

Every block matrix is encoded at int6 with GPTQConfig's clip (12.85 sigmas) by:
  gptq6       plain GPTQ; bytes = artifact.quantized_bytes (its section: codes and fp16 scales)
  fd          freeze-dry as configured by default (falls back to plain unless >= 2 % smaller)
  fd-forced   freeze-dry with both gates off: every element within half a step of its prediction
              is dropped, and the result kept even if it does not shrink (what it would cost)
  2:4         2:4 sparsity, OBS saliency + GPTQ-style compensation, kept values on the int6 grid
  2:4-naive   2:4 by magnitude, then round to nearest (the seed code's choice, corrected grid)
  gptq5/4     plain GPTQ at fewer bits: the dense alternative at about 2:4's byte count
Bytes of fd and 2:4 are their sections' payloads (their code matrices and scales go through the
artifact's own tensor coder); their few framing bytes per matrix are printed apart, as the
artifact container frames plain tensors too. Damage: dBPB on the fixed sweep subset with *all*
block matrices replaced by a codec's dequantized weights, beside its noise floor (the standard
error of the paired per-window differences), against float and against gptq6. Encoding times
are wall-clock on 2 threads: noisy on a shared machine.
"""

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pgolf.model.checkpoint import load_model
from pgolf.quant import freezedry, sparse24
from pgolf.quant.artifact import quantized_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, sdclip_scales
from pgolf.quant.sweep import (
    damage,
    load_subset,
    mean_and_se,
    prefix_cache,
    swapped,
    window_nlls,
)

BITS = 6
CODECS = ["gptq6", "fd", "fd-forced", "2:4", "2:4-naive", "gptq5", "gptq4"]


def payload(blob: bytes, codec: str) -> tuple[int, int]:
    """(bytes of a blob's sections, bytes of its framing)."""
    module = freezedry if codec.startswith("fd") else sparse24
    _, sections = freezedry.unframe(blob, module.MAGIC, module.HEAD)
    data = sum(len(d) for _, d in sections)
    return data, len(blob) - data


def encode_one(codec: str, W: torch.Tensor, H: torch.Tensor, gptq: GPTQConfig) -> dict:
    """One matrix through one codec: dequantized weights, bytes, framing, dropped fraction."""
    clip = gptq.default_clip(BITS)
    if codec.startswith("gptq"):
        bits = int(codec[4:])
        codes, scales = gptq.quantize(W, H, bits)
        size = quantized_bytes(codes.numpy(), scales.numpy(), bits)
        return {"W": dequantize(codes, scales), "bytes": size, "framing": 0, "dropped": 0.0}
    if codec.startswith("fd"):
        forced = codec == "fd-forced"
        cfg = freezedry.FreezeDryConfig(force=forced, column_gate=not forced, gptq=gptq)
        rep = freezedry.encode(W, H, bits=BITS, clip_sigmas=clip, cfg=cfg)
        blob, dropped = freezedry.pack(rep), rep.dropped_fraction if rep.applied else 0.0
        deq = freezedry.dequantize(rep)
    else:
        if codec == "2:4":
            rep = sparse24.encode(W, H, bits=BITS, clip_sigmas=clip)
        else:
            scales = sdclip_scales(W, bits=BITS, clip_sigmas=clip)
            rep = sparse24.magnitude_prune(W, scales, bits=BITS)
        blob, dropped, deq = sparse24.pack(rep), 0.5, sparse24.dequantize(rep)
    size, framing = payload(blob, codec)
    return {"W": deq, "bytes": size, "framing": framing, "dropped": dropped}


def neighbour_r2(W: torch.Tensor, deq: torch.Tensor) -> float:
    """Median over freeze-dry's candidate columns of the R^2 of predicting the float column from
    its dequantized neighbours with freeze-dry's own least-squares fit."""
    scores = []
    for j in freezedry.candidate_columns(W.size(1)).tolist():
        ab = freezedry.fit(W[:, j], deq[:, j - 1], deq[:, j + 1])
        residual = W[:, j] - freezedry.predict(deq[:, j - 1], deq[:, j + 1], ab)
        scores.append(1 - float(residual.var() / W[:, j].var()))
    return float(torch.tensor(scores).median())


def encode_all(state: dict, hessians: dict, names: list[str]) -> dict:
    """results[codec][matrix] = encode_one(...) plus its seconds."""
    gptq = GPTQConfig()
    results = {codec: {} for codec in CODECS}
    for name in names:
        for codec in CODECS:
            start = time.perf_counter()
            row = encode_one(codec, state[name], hessians[name], gptq)
            row["seconds"] = time.perf_counter() - start
            results[codec][name] = row
        results["gptq6"][name]["r2"] = neighbour_r2(state[name].float(),
                                                    results["gptq6"][name]["W"])
    return results


def print_matrices(results: dict, names: list[str]) -> None:
    print("per matrix, int6 (bytes; fd: whether the gate kept it, fd-forced's dropped %; "
          "ms to encode)")
    print("R2: median over candidate columns of the neighbour fit's R^2 (0: no prediction)")
    print(f"{'matrix':28s} {'gptq6':>7s} {'fd':>7s} {'kept':>4s} {'fd-forced':>9s} {'drop%':>5s} "
          f"{'R2':>5s} {'2:4':>7s} {'gptq4':>7s} {'ms gptq6':>8s} {'ms fd':>6s} {'ms 2:4':>6s}")
    for name in names:
        r = {codec: results[codec][name] for codec in CODECS}
        kept = "yes" if r["fd"]["dropped"] > 0 else "no"
        print(f"{name:28s} {r['gptq6']['bytes']:7d} {r['fd']['bytes']:7d} {kept:>4s} "
              f"{r['fd-forced']['bytes']:9d} {100 * r['fd-forced']['dropped']:5.1f} "
              f"{r['gptq6']['r2']:5.2f} {r['2:4']['bytes']:7d} {r['gptq4']['bytes']:7d} "
              f"{1000 * r['gptq6']['seconds']:8.0f} {1000 * r['fd']['seconds']:6.0f} "
              f"{1000 * r['2:4']['seconds']:6.0f}")


def damage_all(model, results: dict, names: list[str], subset) -> dict:
    """Per codec, per-window BPB differences against float, all block matrices replaced."""
    cached = prefix_cache(model, subset, 0)
    base = window_nlls(model, cached, 0)
    diffs = {}
    for codec in CODECS:
        with swapped(model, {name: results[codec][name]["W"] for name in names}):
            nll = window_nlls(model, cached, 0)
        diffs[codec] = damage(nll, base, subset.num_bytes)["per_window"]
    return diffs


def mean_se(diff: torch.Tensor) -> tuple[float, float]:
    summary = mean_and_se(diff)
    return summary["dbpb"], summary["noise_se"]


def print_summary(results: dict, diffs: dict, names: list[str]) -> None:
    plain = sum(results["gptq6"][n]["bytes"] for n in names)
    print(f"\nall {len(names)} block matrices replaced ({len(diffs['gptq6'])} windows); "
          "dBPB +- noise SE")
    print(f"{'codec':10s} {'bytes':>9s} {'/gptq6':>7s} {'framing':>7s} {'s/matrix':>8s} "
          f"{'dBPB vs float':>20s} {'dBPB vs gptq6':>20s}")
    for codec in CODECS:
        rows = results[codec].values()
        size = sum(r["bytes"] for r in rows)
        seconds = sum(r["seconds"] for r in rows) / len(names)
        vs_float = mean_se(diffs[codec])
        vs_plain = mean_se(diffs[codec] - diffs["gptq6"])
        print(f"{codec:10s} {size:9,d} {size / plain:7.3f} {sum(r['framing'] for r in rows):7d} "
              f"{seconds:8.3f} {vs_float[0]:+10.5f} +- {vs_float[1]:.5f} "
              f"{vs_plain[0]:+10.5f} +- {vs_plain[1]:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("results/demo/seed1"))
    parser.add_argument("--data-dir", type=Path, default=Path("results/demo/data"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    state = load_file(str(args.run_dir / "model.safetensors"))
    hessians = load_file(str(args.run_dir / "hessians.safetensors"))
    names = [n for n in state if n.startswith("blocks.") and state[n].dim() == 2 and n in hessians]
    results = encode_all(state, hessians, names)
    print_matrices(results, names)
    model = load_model(args.run_dir / "model.safetensors").eval()
    subset = load_subset(args.data_dir / "shards", args.data_dir / "tokenizer.model",
                         model.cfg.vocab_size, windows=args.windows, seq_len=args.seq_len,
                         batch_seqs=16)
    print_summary(results, damage_all(model, results, names, subset), names)


if __name__ == "__main__":
    main()
