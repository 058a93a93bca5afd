"""Row reordering before compression (the SOTA record's pergroup step 2), measured on pgolf's codec.

    python bench/row_reorder.py --run-dir results/demo/seed1   # a trained model and its Hessians
    python bench/row_reorder.py --build /tmp/row_reorder        # first train a demo-size model
                                                                # (config.yaml's model and train)

The record sorts the rows of its "hot" int8 groups (tok_emb, attn.c_q, mlp.fc; layers
concatenated) in a greedy L1 nearest-neighbour order of the codes (start at row 0, then always the
nearest unvisited row) and stores the uint16 permutation: its compressor (lrzip/ZPAQ over the
column-major byte stream) gains from similar neighbouring rows. pgolf codes each quantized tensor
alone with context-modelled rANS, row references (a row may be coded against any of the 8192
rows before it) and row classes, so the order matters less. Printed, on GPTQ codes of the uniform
allocation (int6 matrices, int8 embedding, the configured k):
  per tensor  bytes as stored (artifact.quantized_bytes: codes and scales), bytes with rows and
              their scales in the greedy order, the permutation's bytes (uint16 + brotli-11 as the
              record stores it; the bound log2(n!) / 8 beside it), and the net change;
  per group   the same with a role's layers concatenated into one tensor (the record's grouping).
Net < 0 would mean the switch pays; the verdict line sums the hot groups and all tensors.

Measured with --build (config.yaml's demo model, 200 steps, seed 1; CPU): it does not
pay, so pgolf has no reorder switch. Block matrices code to the same bytes in either order (+-6 B:
row references already reach every earlier row), so each pays its permutation in full
(67-623 B); the embedding saves 749 B of 66,188 (1.1%) but its permutation costs 1,307 B (the
bound log2(1024!)/8 alone is 1,096 B). Net: +5,164 B over all tensors, +3,570 B on the hot
ones; concatenating a role's layers as the record does: +5,898 B and +4,085 B. Untested at the
record's size (an 8192-row embedding, whose permutation bound is ~11.8 KB): run --run-dir on
such a checkpoint before concluding there.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import brotli
import numpy as np
from safetensors.torch import load_file

from pgolf.config import load_config
from pgolf.data.corpus import read_jsonl
from pgolf.data.encode import ShardsConfig, encode_corpus
from pgolf.data.manifest import ManifestConfig, build_manifest
from pgolf.data.scores import ScoresConfig, score_windows
from pgolf.data.tokenizer import TokenizerConfig, train_tokenizer
from pgolf.io import write_json
from pgolf.model.checkpoint import read_config
from pgolf.quant.allocate import uniform_bits
from pgolf.quant.artifact import quantized_bytes
from pgolf.quant.gptq import GPTQConfig
from pgolf.quant.hessian import HessianConfig, build_hessians

ROOT = Path(__file__).resolve().parents[1]

HOT = ("tok_emb", "attn.c_q", "mlp.fc")


def greedy_l1_order(codes: np.ndarray) -> np.ndarray:
    """Rows in greedy nearest-neighbour order by L1 distance of their codes, from row 0."""
    rows = codes.astype(np.int32)
    left = np.ones(len(rows), dtype=bool)
    order, current = [0], 0
    left[0] = False
    for _ in range(len(rows) - 1):
        candidates = np.nonzero(left)[0]
        dist = np.abs(rows[candidates] - rows[current]).sum(axis=1)
        current = int(candidates[np.argmin(dist)])
        order.append(current)
        left[current] = False
    return np.array(order)


def permutation_bytes(order: np.ndarray) -> tuple[int, float]:
    """(uint16 + brotli-11 bytes, the information bound log2(n!) / 8) of a row permutation."""
    stored = len(brotli.compress(order.astype("<u2").tobytes(), quality=11))
    return stored, math.lgamma(len(order) + 1) / math.log(2) / 8


def compare(codes: np.ndarray, scales: np.ndarray, bits: int) -> dict:
    order = greedy_l1_order(codes)
    plain = quantized_bytes(codes, scales, bits)
    sorted_bytes = quantized_bytes(codes[order], scales[order], bits)
    perm, bound = permutation_bytes(order)
    return {"rows": len(codes), "plain": plain, "sorted": sorted_bytes, "perm": perm,
            "perm_bound": bound, "net": sorted_bytes + perm - plain}


def role_of(name: str) -> str:
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else parts[0]


def quantized(model_path: Path, hessians_path: Path) -> dict:
    """{name: (codes, scales, bits)}: GPTQ of the uniform allocation."""
    cfg, _ = read_config(model_path)
    state, hessians = load_file(str(model_path)), load_file(str(hessians_path))
    gptq, out = GPTQConfig(), {}
    for name, bits in uniform_bits(cfg, matrix_bits=6, embed_bits=8).items():
        codes, scales = gptq.quantize(state[name], hessians[name], bits, name=name)
        out[name] = (codes.numpy(), scales.numpy(), bits)
    return out


def table(rows: list[tuple[str, str, dict]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'':34} {'rows':>6} {'stored':>9} {'sorted':>9} {'perm':>7} {'bound':>7} {'net':>8}")
    for label, _, r in rows:
        print(f"{label:34} {r['rows']:6d} {r['plain']:9,d} {r['sorted']:9,d} {r['perm']:7,d} "
              f"{r['perm_bound']:7.0f} {r['net']:+8,d}")


def measure(tensors: dict) -> dict:
    """Per tensor and per role group (layers concatenated): (label, role, plain vs sorted)."""
    per_tensor = [(n, role_of(n), compare(*t)) for n, t in tensors.items()]
    groups: dict = {}
    for name, (codes, scales, bits) in tensors.items():
        groups.setdefault((role_of(name), bits), []).append((codes, scales))
    per_group = [(f"{role} (int{bits}, {len(ts)} tensors)", role,
                  compare(np.concatenate([c for c, _ in ts]), np.concatenate([s for _, s in ts]),
                          bits)) for (role, bits), ts in groups.items()]
    return {"tensors": per_tensor, "groups": per_group}


def verdict(result: dict) -> None:
    for key, rows in result.items():
        stored = sum(r["plain"] for _, _, r in rows)
        net = sum(r["net"] for _, _, r in rows)
        hot = sum(r["net"] for _, role, r in rows if role in HOT)
        print(f"{key}: net {net:+,d} B of {stored:,d} B stored; {hot:+,d} B on the record's "
              f"hot groups {HOT}")

def build_data(out: Path, config: dict, docs: int) -> None:
    """Tokenizer, shards, window scores and curriculum of the bundled corpus's first `docs`."""
    texts = [t for _, t in zip(range(docs), read_jsonl(ROOT / "data" / "sotu.jsonl.xz"),
                               strict=False)]
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    vocab, seq_len = config["tokenizer"]["vocab_size"], config["train"]["seq_len"]
    train_tokenizer(texts, out / "tokenizer.model", cfg=TokenizerConfig(vocab_size=vocab),
                    threads=2)
    summary = encode_corpus(out / "docs.jsonl", out / "tokenizer.model", out / "shards",
                            cfg=ShardsConfig(**config["shards"]), corpus={"count": len(texts)})
    write_json(out / "shards.json", summary)  # the trainer reads it beside the shards
    score_windows(out / "shards", out / "tokenizer.model", out / "scores.parquet",
                  seq_len=seq_len, cfg=ScoresConfig(), vocab_size=vocab)
    build_manifest(out / "scores.parquet", out / "curriculum.parquet", out / "curriculum.json",
                   cfg=ManifestConfig(**config["manifest"]))


def build_model(out: Path, docs: int) -> None:
    """config.yaml's demo model, trained by pgolf's trainer, and its Hessians (seed 1)."""
    config = load_config(ROOT / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    build_data(out, config, docs)
    model = {**config["model"], "vocab_size": config["tokenizer"]["vocab_size"]}
    spec = json.dumps({"model": model, "train": config["train"]}, sort_keys=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=1", "-m", "pgolf.train", "--spec", spec, "--seed", "1",
                    "--shards", str(out / "shards"), "--manifest", str(out / "curriculum.parquet"),
                    "--tokenizer", str(out / "tokenizer.model"), "--state-dir", str(out / "state"),
                    "--model", str(out / "model.safetensors"), "--meta", str(out / "train.json"),
                    "--metrics", str(out / "metrics.parquet"), "--threads", "2"], check=True)
    build_hessians(out / "model.safetensors", out / "shards", out / "hessians.safetensors",
                   cfg=HessianConfig(**config["hessian"]), seq_len=config["train"]["seq_len"],
                   seed=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, help="holds model.safetensors, hessians.safetensors")
    p.add_argument("--build", type=Path, help="train a demo-size model into this folder first")
    p.add_argument("--docs", type=int, default=240, help="corpus documents for --build")
    args = p.parse_args()
    run_dir = args.run_dir or args.build
    if args.build and not (args.build / "hessians.safetensors").exists():
        build_model(args.build, args.docs)
    result = measure(quantized(run_dir / "model.safetensors", run_dir / "hessians.safetensors"))
    table(result["tensors"], "per tensor (as pgolf codes them: each alone)")
    table(result["groups"], "per role group, layers concatenated (the record's grouping)")
    verdict(result)


if __name__ == "__main__":
    main()
