"""Entry point run by torchrun: one training run of one seed, from shards to EMA weights.

    torchrun --standalone --nproc_per_node=N -m pgolf.train --spec JSON --seed S ...

Outputs (rank 0): model.safetensors (EMA weights; the model config in its metadata), train.json
(config, steps, tokens, timings, losses, validation BPB beside the unigram baseline) and
metrics.parquet (one row per step). Resume states go to --state-dir, outside the outputs.
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.config import section
from pgolf.data.bytecount import byte_counter
from pgolf.data.loader import open_streams
from pgolf.data.shards import list_shards, summary_path, token_counts
from pgolf.eval.bpb import evaluate, unigram_bpb, val_stream
from pgolf.io import read_json, sha256_file, write_json
from pgolf.model.checkpoint import save_model
from pgolf.model.gpt import GPTConfig
from pgolf.provenance import Provenance
from pgolf.train import distributed
from pgolf.train.checkpoint import load_state, save_state
from pgolf.train.trainer import Run, TrainConfig, build_run, train_loop

# pyarrow is imported where used: the exported train_gpt.py ships this module without it.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pgolf.train", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help='JSON {"model": {...}, "train": {...}}')
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--shards", type=Path, required=True, help="shard folder")
    p.add_argument("--manifest", type=Path, required=True, help="curriculum.parquet")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True, help="resume states (not outputs)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--meta", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--code", default=None, help="code hash, for provenance")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for this process group")
    return p.parse_args(argv)


def fingerprint(args, spec: dict) -> str:
    """What a resume state must match: config, seed, code and the bytes of the inputs."""
    parts = [json.dumps(spec, sort_keys=True), str(args.seed), str(args.code),
             sha256_file(summary_path(args.shards)), sha256_file(args.manifest)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def snapshot(run: Run) -> dict:
    return {"model": copy.deepcopy(run.model.state_dict()),
            "optim": [copy.deepcopy(o.state_dict()) for o in run.optimizers],
            "streams": [copy.deepcopy(s.state_dict()) for s in run.streams],
            "ema": copy.deepcopy(run.ema.shadow) if run.ema else None}


def restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    for opt, s in zip(run.optimizers, state["optim"], strict=True):
        opt.load_state_dict(s)
    for stream, s in zip(run.streams, state["streams"], strict=True):
        stream.load_state_dict(s)
    if run.ema is not None:
        run.ema.shadow = {k: v.float().clone() for k, v in state["ema"].items()}


def compile_warmup(run: Run, steps: int) -> float:
    """Untimed steps that compile every graph variant (looping off and on), then a full reset,
    as the challenge counts time: the warm-up's updates are thrown away."""
    if steps <= 0:
        return 0.0
    start, saved = time.perf_counter(), snapshot(run)
    cfg = run.cfg
    for loop_at in ([1.1, 0.0] if run.model.cfg.num_loops else [1.1]):
        run.cfg = dataclasses.replace(cfg, steps=run.step + steps, max_seconds=None,
                                      progress="steps", loop_enable_at=loop_at)
        train_loop(run)
    run.cfg, run.step, run.elapsed, run.metrics = cfg, 0, 0.0, []
    restore(run, saved)
    return time.perf_counter() - start


def try_resume(run: Run, state_dir: Path, key: str) -> int | None:
    """Load this rank's latest state if every rank has one for the same run; return its step."""
    state = load_state(state_dir / f"rank{run.dist.rank}")
    step = state["step"] if state is not None and state["fingerprint"] == key else -1
    # One MAX over (step, -step) gives the max and the min step across ranks.
    both = torch.tensor([step, -step], device=run.dist.device)
    distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if step < 0 or int(both[0]) != -int(both[1]):
        return None
    restore(run, state)
    run.step, run.elapsed, run.metrics = state["step"], state["elapsed"], state["metrics"]
    return run.step


def checkpointer(state_dir: Path, key: str, every: int):
    def on_step(run: Run) -> None:
        if every and run.step % every == 0 and run.step < (run.cfg.steps or float("inf")):
            state = {**snapshot(run), "step": run.step, "elapsed": run.elapsed,
                     "metrics": run.metrics, "fingerprint": key}
            save_state(state_dir / f"rank{run.dist.rank}", run.step, state)
    return on_step


def validate(run: Run, args) -> dict:
    """Validation BPB of the final (EMA) weights beside the unigram null baseline."""
    counter = byte_counter(args.shards, args.tokenizer, run.model.cfg.vocab_size)
    stream, cfg = val_stream(args.shards), run.cfg
    run.model.eval()
    result = evaluate(run.model, stream, counter, seq_len=cfg.seq_len,
                      batch_seqs=cfg.val_batch_seqs, device=run.dist.device, rank=run.dist.rank,
                      world=run.dist.world, max_tokens=cfg.val_max_tokens,
                      autocast=run.dist.device.type == "cuda")
    counts = token_counts(list_shards(args.shards, "train"), run.model.cfg.vocab_size,
                          limit=100_000_000)
    null = unigram_bpb(counts, stream, counter, seq_len=cfg.seq_len, max_tokens=cfg.val_max_tokens)
    return {"model": result, "unigram": null}


def summary(run: Run, args, spec: dict, timings: dict, val: dict, prov: Provenance) -> dict:
    losses = [m["loss"] for m in run.metrics]
    looping = [m["step"] for m in run.metrics if m["looping"]]
    return {"config": spec, "seed": args.seed, "world_size": run.dist.world,
            "device": str(run.dist.device), "steps": run.step,
            "tokens": run.step * run.cfg.batch_tokens, "train_seconds": run.elapsed,
            **timings, "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "looping_from_step": looping[0] if looping else None,
            "stopped_by": "steps" if run.cfg.steps and run.step >= run.cfg.steps else "wallclock",
            "params": sum(p.numel() for p in run.model.parameters()),
            "val": val, "provenance": prov.record()}


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = json.loads(args.spec)
    model_cfg = section(GPTConfig, spec.get("model"), "model")
    cfg = section(TrainConfig, spec.get("train"), "train")
    dist = distributed.init(cfg.device)
    try:
        return run_training(args, spec, model_cfg, cfg, dist)
    except ValueError as err:
        print(f"pgolf: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.cleanup()


def run_training(args, spec, model_cfg: GPTConfig, cfg: TrainConfig, dist) -> int:
    if args.threads and dist.device.type == "cpu":
        torch.set_num_threads(max(1, args.threads // dist.world))
    if cfg.nproc != dist.world:
        raise ValueError(f"train.nproc={cfg.nproc} but torchrun started {dist.world} processes")
    shards_meta = read_json(summary_path(args.shards))
    if shards_meta["vocab_size"] != model_cfg.vocab_size:
        raise ValueError(f"{args.shards}: tokenizer vocab {shards_meta['vocab_size']} does not "
                         f"match model.vocab_size={model_cfg.vocab_size}")
    bos = shards_meta.get("bos_id", model_cfg.bos_id)
    if (model_cfg.smear_gate or model_cfg.doc_isolation) and bos != model_cfg.bos_id:
        raise ValueError(f"{args.shards}: tokenizer BOS {bos} does not match "
                         f"model.bos_id={model_cfg.bos_id}")
    prov = Provenance(stage="train", config=spec, code=args.code,
                      inputs=[summary_path(args.shards), args.manifest, args.tokenizer])
    run = open_run(model_cfg, cfg, dist=dist, shard_dir=args.shards, manifest=args.manifest,
                   seed=args.seed)
    key = fingerprint(args, spec)
    warmup_seconds = compile_warmup(run, cfg.compile_warmup_steps)
    resumed = try_resume(run, args.state_dir, key)
    log = progress_printer(run, resumed)
    save = checkpointer(args.state_dir, key, cfg.checkpoint_every)
    train_loop(run, on_step=lambda r: (save(r), log(r)))
    if run.ema is not None:
        run.ema.copy_to(run.model)
    val = validate(run, args)
    timings = {"compile_warmup_seconds": warmup_seconds, "resumed_from_step": resumed}
    if dist.main:
        save_model(args.model, run.model, seed=args.seed, step=run.step,
                   looping=run.model.looping)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(run.metrics), args.metrics)
        write_json(args.meta, summary(run, args, spec, timings, val, prov))
        shutil.rmtree(args.state_dir, ignore_errors=True)  # finished: the resume state is spent
        print(f"val_bpb {val['model']['bpb']:.4f} (unigram {val['unigram']['bpb']:.4f})")
    return 0


def open_run(model_cfg: GPTConfig, cfg: TrainConfig, *, dist, shard_dir: Path, manifest,
             seed: int) -> Run:
    """This rank's loader streams (each rank reads whole streams), the model and optimizers."""
    mine = list(range(dist.rank, cfg.loader.streams, dist.world))
    streams = open_streams(cfg.loader, shard_dir=shard_dir, manifest=manifest,
                           seq_len=cfg.seq_len, vocab_size=model_cfg.vocab_size, seed=seed,
                           streams=mine)
    return build_run(model_cfg, cfg, dist=dist, streams=streams, seed=seed)


def progress_printer(run: Run, resumed: int | None):
    if run.dist.main:
        print(f"model {sum(p.numel() for p in run.model.parameters())} params; world "
              f"{run.dist.world}; device {run.dist.device}"
              + (f"; resumed at step {resumed}" if resumed else ""), flush=True)

    def log(r: Run) -> None:
        every = r.cfg.log_every
        if r.dist.main and every and (r.step % every == 0 or r.step == r.cfg.steps):
            m = r.metrics[-1]
            print(f"step {m['step']} loss {m['loss']:.4f} lr_mul {m['lr_mul']:.3f} "
                  f"{m['tokens_per_s']:.0f} tok/s elapsed {m['elapsed']:.1f}s"
                  + (" looping" if m["looping"] else ""), flush=True)
    return log
