"""Entry point of the evaluation stages: one mode of one model, under torchrun or plain python.

    python -m pgolf.eval --mode sliding --artifact A.pgz --shards D --tokenizer T --spec JSON ...

`prequant` scores the float checkpoint; every other mode rebuilds the model from the packed
artifact alone (the config stored in it, dequantized weights): what is scored is what ships.
`roundtrip` then applies the damage-gap guard against prequant's result. `phased_ttt` is the SOTA
record's phased LoRA TTT (pgolf.eval.phased). Rank 0 writes the JSON.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf.config import section
from pgolf.data.bytecount import ByteCounter, byte_counter, load_tokenizer
from pgolf.eval.bpb import val_stream
from pgolf.eval.guard import GuardConfig, check_damage_gap, tensor_damage
from pgolf.eval.phased import LoRATTTConfig, phased_bpb
from pgolf.eval.sliding import sliding_bpb
from pgolf.eval.ttt import TTTConfig, ttt_bpb
from pgolf.io import read_json, write_json
from pgolf.model.checkpoint import load_model
from pgolf.model.gpt import GPT, GPTConfig
from pgolf.provenance import Provenance
from pgolf.quant.artifact import dequantize_tensors, read_artifact
from pgolf.train import distributed

MODES = ("prequant", "roundtrip", "sliding", "ttt", "phased_ttt")


@dataclass(kw_only=True)
class EvalConfig:
    seq_len: int = 2048
    stride: int = 64  # sliding and ttt: targets scored per window after the first
    batch_seqs: int = 32  # windows per forward batch (per rank)
    max_tokens: int | None = None  # score only the first max_tokens targets (None = all)
    device: str = "cpu"  # cpu | cuda | auto
    nproc: int = 1  # processes (torchrun when > 1)
    autocast: bool | None = None  # bf16 autocast; None = on CUDA only
    compile: bool = False  # torch.compile the model (its compile time is in `seconds`)

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"eval.max_tokens = {self.max_tokens}: must be at least one "
                             f"window of eval.seq_len = {self.seq_len}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pgolf.eval", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--spec", required=True, help='JSON {"eval": {...}, "guard": {...}, '
                   '"ttt": {...}, "lora_ttt": {...}}: the slices this mode reads')
    p.add_argument("--model", type=Path, help="float checkpoint (prequant; the guard's report)")
    p.add_argument("--artifact", type=Path, help="packed artifact (every mode but prequant)")
    p.add_argument("--prequant", type=Path, help="prequant result (roundtrip's guard)")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, action="append", required=True,
                   help="result JSON (repeat: the same result to each path)")
    p.add_argument("--code", default=None, help="code hash, for provenance")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for this process group")
    args = p.parse_args(argv)
    need = "model" if args.mode == "prequant" else "artifact"
    if getattr(args, need) is None or (args.mode == "roundtrip" and not args.prequant):
        p.error(f"--mode {args.mode} needs --{need}"
                + (" and --prequant" if args.mode == "roundtrip" else ""))
    return args


def artifact_model(path: Path) -> GPT:
    """The model a packed artifact stands for: its stored config, its dequantized weights."""
    tensors, meta = read_artifact(path)
    if "model" not in meta:
        raise ValueError(f"artifact {path}: no model config in its header")
    model = GPT(section(GPTConfig, meta["model"], "model"))
    try:
        model.load_state_dict(dequantize_tensors(tensors))
    except RuntimeError as err:  # missing, extra or misshapen tensors
        raise ValueError(f"artifact {path}: its tensors do not fit its model config "
                         f"({str(err).splitlines()[0]})") from None
    model.looping = bool(meta.get("looping", False))
    return model


def score(mode: str, model, stream, counter: ByteCounter, *, cfg: EvalConfig, ttt: TTTConfig,
          dist: distributed.Dist, lora: LoRATTTConfig | None = None, bos: int = 1) -> dict:
    autocast = dist.device.type == "cuda" if cfg.autocast is None else cfg.autocast
    common = dict(seq_len=cfg.seq_len, batch_seqs=cfg.batch_seqs, device=dist.device,
                  rank=dist.rank, world=dist.world, max_tokens=cfg.max_tokens, autocast=autocast)
    if mode == "phased_ttt":  # documents in chunks of its own; sums over TTT's chunks to pair
        del common["batch_seqs"]
        lora = lora or LoRATTTConfig()
        return {**phased_bpb(model, stream, counter, cfg=lora, chunk_tokens=ttt.chunk_tokens,
                             bos=bos, **common), "lora_ttt": asdict(lora)}
    if mode != "ttt":  # stride = seq_len is roundtrip's windows; per-chunk sums on TTT's
        # chunks pair any two modes over the same chunks (their noise floor)
        stride = cfg.seq_len if mode in ("prequant", "roundtrip") else cfg.stride
        return sliding_bpb(model, stream, counter, stride=stride, chunk_tokens=ttt.chunk_tokens,
                           **common)
    return {**ttt_bpb(model, stream, counter, cfg=ttt, stride=cfg.stride, **common),
            "ttt": asdict(ttt)}


def score_files(mode: str, model, shards: Path, tokenizer: Path, spec: dict, *, cfg: EvalConfig,
                dist: distributed.Dist) -> dict:
    """`score` on a shard folder's val stream, its bytes as BPB divides by them (the CaseOps
    sidecar or the tokenizer's tables) and the TTT slices of `spec`."""
    counter = byte_counter(shards, tokenizer, model.cfg.vocab_size)
    return score(mode, model, val_stream(shards), counter, cfg=cfg,
                 ttt=section(TTTConfig, spec.get("ttt"), "ttt"), dist=dist,
                 lora=section(LoRATTTConfig, spec.get("lora_ttt"), "lora_ttt"),
                 bos=load_tokenizer(tokenizer).bos_id())


def run_eval(args, spec: dict, dist: distributed.Dist) -> dict:
    cfg = section(EvalConfig, spec.get("eval"), "eval")
    if cfg.nproc != dist.world:
        raise ValueError(f"eval.nproc={cfg.nproc} but {dist.world} processes were started")
    source = args.model if args.mode == "prequant" else args.artifact
    prov = Provenance(stage=f"eval_{args.mode}", config=spec, code=args.code,
                      inputs=[source, args.tokenizer, *([args.prequant] if args.prequant else [])])
    start = time.perf_counter()
    model = load_model(source) if args.mode == "prequant" else artifact_model(source)
    model.to(dist.device).eval()
    if cfg.compile:
        model.compile(dynamic=False)
    result = score_files(args.mode, model, args.shards, args.tokenizer, spec, cfg=cfg, dist=dist)
    if not math.isfinite(result["loss"]):
        raise ValueError(f"{source}: non-finite {args.mode} loss {result['loss']}")
    result = {"mode": args.mode, "source": str(source), **result,
              "seconds": time.perf_counter() - start, "seq_len": cfg.seq_len,
              "vocab_size": model.cfg.vocab_size, "device": str(dist.device),
              "world_size": dist.world, "compile": cfg.compile}
    if args.mode == "roundtrip":
        result["guard"] = guard(args, result, model.cfg.vocab_size,
                                section(GuardConfig, spec.get("guard"), "eval.guard"))
    return {**result, "provenance": prov.record()}


def guard(args, result: dict, vocab_size: int, cfg: GuardConfig) -> dict:
    def damage():
        float_state = load_model(args.model).state_dict()
        tensors, _ = read_artifact(args.artifact)
        dequantized = dequantize_tensors(tensors)
        return [tensor_damage(n, float_state[n], t, dequantized[n])
                for n, t in tensors.items() if not isinstance(t, torch.Tensor) or t.ndim >= 2]
    return check_damage_gap(args.artifact, result, read_json(args.prequant),
                            vocab_size=vocab_size, cfg=cfg, damage=damage)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = json.loads(args.spec)
    dist = distributed.init((spec.get("eval") or {}).get("device", "cpu"), "eval.device")
    try:
        if args.threads and dist.device.type == "cpu":
            torch.set_num_threads(max(1, args.threads // dist.world))
        result = run_eval(args, spec, dist)
        if dist.main:
            for out in args.out:
                write_json(out, result)
            print(f"{args.mode}: val_bpb {result['bpb']:.6f} loss {result['loss']:.6f} "
                  f"({result['tokens']} tokens, {result['seconds']:.1f} s)")
        return 0
    except ValueError as err:
        print(f"pgolf: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.cleanup()
