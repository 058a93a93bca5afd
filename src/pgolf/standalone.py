"""The program of an exported records/ train_gpt.py: one seed from shards to its scored artifact.

It runs the pipeline's own stages in one process group, with the run's settings frozen in:
the curriculum (window scores and buckets, in memory), training, Hessians on training windows,
GPTQ at the frozen allocation's bits and clips, packing, the size gate, then the artifact read
back from disk and scored in the submission's eval mode. Log lines follow the records' wording.
Data paths come from upstream's environment variables (SEED, DATA_PATH / TOKENIZER_PATH, or
DATA_DIR with the records' layout); no pyarrow, safetensors or pipeline I/O is needed.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.bundle import decode_allocation
from pgolf.config import section
from pgolf.data.manifest import ManifestConfig, assign_buckets
from pgolf.data.scores import ScoresConfig, window_scores
from pgolf.eval.run import EvalConfig, artifact_model, score_files
from pgolf.io import write_bytes
from pgolf.model.gpt import GPTConfig, quantizable_matrices
from pgolf.quant.artifact import pack_artifact
from pgolf.quant.export import PackConfig, encode_state, size_gate
from pgolf.quant.gptq import GPTQConfig
from pgolf.quant.hessian import HessianConfig, calibrate
from pgolf.quant.lqer import LQERConfig
from pgolf.train import distributed
from pgolf.train.main import compile_warmup, open_run, progress_printer
from pgolf.train.trainer import TrainConfig, train_loop

LABELS = {"roundtrip": "quantized", "sliding": "quantized_sliding_window", "ttt": "quantized_ttt",
          "phased_ttt": "quantized_ttt_phased"}
ARTIFACT = "final_model.pgz"


def data_paths(vocab_size: int, env=os.environ) -> tuple[Path, Path]:
    """Shards and tokenizer as upstream's variables give them, else the records' layout."""
    root = Path(env.get("DATA_DIR", "./data/"))
    shards = env.get("DATA_PATH") or root / "datasets" / f"fineweb10B_sp{vocab_size}"
    tokenizer = env.get("TOKENIZER_PATH") or root / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"
    return Path(shards), Path(tokenizer)


def curriculum(spec: dict, shards: Path, tokenizer: Path, *, seq_len: int, vocab_size: int):
    """The curriculum manifest's windows, computed as the window_scores and curriculum stages
    compute them (the same numbers, without the parquet files)."""
    windows = window_scores(shards, tokenizer, cfg=section(ScoresConfig, spec["scores"], "scores"),
                            seq_len=seq_len, vocab_size=vocab_size)
    cfg = section(ManifestConfig, spec["manifest"], "manifest")
    bucket = assign_buckets(windows["score"], cfg.num_buckets).astype(np.int64)
    return {"shard": windows["shard"], "start": windows["start"], "bucket": bucket,
            "num_buckets": cfg.num_buckets}


def train(spec: dict, seed: int, shards: Path, tokenizer: Path, dist):
    """The train stage's run: streams, model, warm-up, loop, EMA weights copied in."""
    model_cfg = section(GPTConfig, spec["model"], "model")
    cfg = section(TrainConfig, spec["train"], "train")
    if cfg.nproc != dist.world:
        raise ValueError(f"train.nproc={cfg.nproc} but torchrun started {dist.world} processes")
    manifest = None
    if cfg.loader.sampler == "curriculum":
        start = time.perf_counter()
        manifest = curriculum(spec, shards, tokenizer, seq_len=cfg.seq_len,
                              vocab_size=model_cfg.vocab_size)
        log(dist, f"curriculum: {len(manifest['start'])} windows scored in "
                  f"{time.perf_counter() - start:.1f}s")
    run = open_run(model_cfg, cfg, dist=dist, shard_dir=shards, manifest=manifest, seed=seed)
    compile_warmup(run, cfg.compile_warmup_steps)
    train_loop(run, on_step=progress_printer(run, None))
    log(dist, f"train_time:{run.elapsed * 1000:.0f}ms step:{run.step}")
    if run.ema is not None:
        run.ema.copy_to(run.model)
    return run


def pack(spec: dict, run, allocation: tuple[dict, dict, dict], shards: Path, seed: int, out: Path,
         code_bytes: int) -> dict:
    """The hessians and artifact stages: calibrate, quantize at the frozen allocation, pack,
    gate on artifact + code bytes; rank 0 writes the file."""
    looping = run.model.looping  # as the checkpoint records it, before calibration sets it
    # in the checkpoint's order (safetensors sorts the names): the artifact keeps that order
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(run.model.state_dict().items())}
    hessian = section(HessianConfig, spec["hessian"], "hessian")
    device = distributed.pick_device(hessian.device, "hessian.device")
    H = calibrate(run.model.to(device), shards, cfg=hessian, seq_len=run.cfg.seq_len, seed=seed,
                  device=device)
    bits, clips, ranks = allocation
    pack_cfg = section(PackConfig, spec["pack"], "pack")
    tensors = encode_state(state, {n: h for n, (h, _) in H.items()}, bits, clips,
                           gptq=section(GPTQConfig, spec["gptq"], "gptq"), pack=pack_cfg,
                           lqer=ranks, lqer_cfg=section(LQERConfig, spec.get("lqer"), "lqer"))
    meta = json.loads(json.dumps({"model": dataclasses.asdict(run.model.cfg), "looping": looping}))
    data, breakdown = pack_artifact(tensors, meta)
    info = {"bytes": len(data), "breakdown": breakdown}
    size_gate(out, info, {"bytes": code_bytes}, pack_cfg)
    if run.dist.main:
        write_bytes(out, data)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return info


def evaluate(spec: dict, artifact: Path, shards: Path, tokenizer: Path, dist) -> dict:
    """The eval stage's mode on the artifact as read back from disk."""
    cfg = section(EvalConfig, spec["eval"], "eval")
    device = distributed.pick_device(cfg.device, "eval.device")
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if dist.world > 1 and device.type != dist.device.type:
        raise ValueError(f"eval.device = {cfg.device!r} under torchrun with train.device on "
                         f"{dist.device.type}: one process group serves both")
    dist = dataclasses.replace(dist, device=device)
    model = artifact_model(artifact).to(device).eval()
    if cfg.compile:
        model.compile(dynamic=False)
    return score_files(spec["mode"], model, shards, tokenizer, spec, cfg=cfg, dist=dist)


def log(dist, line: str) -> None:
    if dist.main:
        print(line, flush=True)


def main(spec: dict, allocations: str, code_path: str) -> int:
    """Train, pack and score one seed (SEED, default the first frozen one); log as records do."""
    seed = int(os.environ.get("SEED", spec["seeds"][0]))
    if seed not in spec["seeds"]:
        raise ValueError(f"SEED={seed}: this train_gpt.py froze the allocations of seeds "
                         f"{spec['seeds']} only")
    names = [n for n, _ in quantizable_matrices(section(GPTConfig, spec["model"], "model"))]
    allocation = decode_allocation(allocations, names, spec["seeds"].index(seed))
    shards, tokenizer = data_paths(spec["model"]["vocab_size"])
    dist = distributed.init(spec["train"].get("device", "auto"))
    try:
        log(dist, f"pgolf run {spec['run']}: seed {seed}, data {shards}, tokenizer {tokenizer}")
        run = train(spec, seed, shards, tokenizer, dist)
        code = Path(code_path).stat().st_size
        info = pack(spec, run, allocation, shards, seed, Path(ARTIFACT), code)
        log(dist, f"Serialized model quantized+pgz: {info['bytes']} bytes")
        log(dist, f"Code size: {code} bytes")
        log(dist, f"Total submission size quantized+pgz: {info['bytes'] + code} bytes")
        start = time.perf_counter()
        result = evaluate(spec, Path(ARTIFACT), shards, tokenizer, dist)
        label, ms = LABELS[spec["mode"]], (time.perf_counter() - start) * 1000
        log(dist, f"{label} val_loss:{result['loss']:.8f} val_bpb:{result['bpb']:.8f} "
                  f"eval_time:{ms:.0f}ms")
        log(dist, f"final_{label}_exact val_loss:{result['loss']!r} val_bpb:{result['bpb']!r}")
        return 0
    finally:
        distributed.cleanup()
