"""Training throughput and MFU of a config's model, through the trainer's own step function.

    python bench/train_throughput.py                                   # the demo model, CPU
    python bench/train_throughput.py --configfile config.yaml configs/record-8xh100.yaml \
        configs/h100x1.yaml --device cuda                              # record model, one GPU
    ... --profile 3 --trace step.json        # then where the time goes: the top ops, a trace

Tokens are random (throughput does not depend on them). FLOPs per token = 6 x (matrix params in
the virtual layer sequence + the LM head) + attention 6 x L_virtual x T x d (QK^T and AV, forward
and backward, counting the causal half). MFU divides by the peak: on CUDA the dense bf16 peak of
an H100 SXM (989 TFLOP/s) unless --peak-tflops says otherwise; on CPU the fp32 matmul rate
measured here, in the same run.
"""

import argparse
import time

import numpy as np
import torch

from pgolf.config import load_config, section
from pgolf.model.gpt import GPTConfig
from pgolf.train.distributed import Dist
from pgolf.train.trainer import TrainConfig, build_run, set_schedule, train_step


class RandomStream:
    def __init__(self, vocab: int, seq_len: int, seed: int):
        self.rng, self.vocab, self.seq_len = np.random.default_rng(seed), vocab, seq_len

    def draw(self, rows: int, progress: float) -> np.ndarray:
        return self.rng.integers(0, self.vocab, size=(rows, self.seq_len + 1))


def flops_per_token(cfg: GPTConfig, seq_len: int, looping: bool) -> float:
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 2 * d * cfg.mlp_hidden
    layers = len(cfg.layer_sequence(looping))
    dense = 6 * (per_layer * layers + cfg.vocab_size * d)
    return dense + 6 * layers * seq_len * d


def cpu_peak_flops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - start)


def measure(run, steps: int, warmup: int, looping: bool) -> float:
    frac = 1.0 if looping else 0.0
    run.cfg.loop_enable_at = 0.5
    for i in range(warmup + steps):
        if i == warmup:
            if run.dist.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        set_schedule(run, frac)
        train_step(run, frac)
    if run.dist.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def profile_steps(run, steps: int, looping: bool, trace: str | None) -> None:
    """Where a step's time goes: torch.profiler over `steps` steps, the ops by their own time on
    the device (CUDA) or the CPU; `trace` also writes a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.dist.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    frac = 1.0 if looping else 0.0
    with profile(activities=activities) as prof:
        for _ in range(steps):
            set_schedule(run, frac)
            train_step(run, frac)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {steps} step(s), looping {looping}, sorted by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=30))
    if trace:
        prof.export_chrome_trace(trace)
        print(f"chrome trace: {trace}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", nargs="+", default=["config.yaml"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile this many steps (looping on when the model loops)")
    parser.add_argument("--trace", default=None, help="Chrome trace file of the profiled steps")
    args = parser.parse_args()
    config = load_config(*args.configfile)
    model_cfg = section(GPTConfig, {**config["model"],
                                    "vocab_size": config["tokenizer"]["vocab_size"]})
    cfg = section(TrainConfig, {**config["train"], "nproc": 1, "device": args.device})
    device = torch.device(args.device)
    streams = [RandomStream(model_cfg.vocab_size, cfg.seq_len, s)
               for s in range(cfg.loader.streams)]
    run = build_run(model_cfg, cfg, dist=Dist(0, 1, 0, device), streams=streams, seed=0)
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "given"
    elif device.type == "cuda":
        peak, source = 989e12, "H100 SXM dense bf16"
    else:
        peak, source = cpu_peak_flops(), "measured fp32 matmul"
    print(f"model {sum(p.numel() for p in run.model.parameters()):,} params; "
          f"{cfg.batch_tokens:,} tokens/step; device {device}; compile {cfg.compile}; "
          f"peak {peak / 1e12:.2f} TFLOP/s ({source})")
    for looping in ([False, True] if model_cfg.num_loops else [False]):
        seconds = measure(run, args.steps, args.warmup, looping)
        tokens = cfg.batch_tokens / seconds
        flops = flops_per_token(model_cfg, cfg.seq_len, looping) * tokens
        print(f"looping {looping!s:5}  {seconds * 1000:8.1f} ms/step  {tokens:12,.0f} tokens/s  "
              f"{flops / 1e12:7.3f} TFLOP/s  MFU {flops / peak:6.1%}")
    if args.profile:
        profile_steps(run, args.profile, bool(model_cfg.num_loops), args.trace)


if __name__ == "__main__":
    main()
