"""Eager vs Triton (model.kernels) time per training step of the MLP and of the loss, on one GPU.

    python bench/kernels.py                      # record shapes: 98304 tokens per rank, d 512,
                                                 # hidden 2048, vocab 8192, bf16
    python bench/kernels.py --tokens 16384       # a smaller GPU

One step is forward + backward: the MLP is fc, leaky_relu(0.5)^2 and proj; the loss is the LM head
matmul, the softcap (30) and the cross-entropy. Each variant runs side by side in this one process:
eager PyTorch, the same eager code under torch.compile (what the trainer runs) and the Triton ops.
Times are CUDA-event medians over --repeats steps after --warmup steps; the peak memory is the
step's, above what its inputs hold. Without CUDA it says so and exits 0.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

CAP, SLOPE = 30.0, 0.5


def eager_mlp(x, w_fc, w_proj):
    return F.linear(F.leaky_relu(F.linear(x, w_fc), SLOPE).square(), w_proj)


def triton_mlp(x, w_fc, w_proj):
    from pgolf.kernels import fused_fc_activation
    return F.linear(fused_fc_activation(x, w_fc, slope=SLOPE), w_proj)


def eager_loss(hidden, w_head, targets):
    logits = F.linear(hidden, w_head).float()
    return F.cross_entropy(CAP * torch.tanh(logits / CAP), targets)


def triton_loss(hidden, w_head, targets):
    from pgolf.kernels import softcapped_cross_entropy
    return softcapped_cross_entropy(F.linear(hidden, w_head), targets, cap=CAP)


def time_step(step, inputs, *, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of forward + backward, and the peak extra GiB."""
    def once():
        out = step(*inputs)
        out.backward(torch.ones_like(out) if out.dim() else None)
    for _ in range(warmup):
        once()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def compare(name: str, eager, fused, inputs, args) -> None:
    variants = {"eager": eager, "compiled": torch.compile(eager), "triton": fused}
    results = {k: time_step(fn, inputs, warmup=args.warmup, repeats=args.repeats)
               for k, fn in variants.items()}
    for k, (ms, gib) in results.items():
        speedup = results["eager"][0] / ms
        print(f"{name:5s} {k:9s} {ms:8.3f} ms  {speedup:5.2f}x eager  peak +{gib:6.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the Triton kernels are timed on a GPU only")
        return
    torch.manual_seed(0)
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(args.tokens, args.dim, **cuda, requires_grad=True)
    w_fc = (torch.randn(args.hidden, args.dim, **cuda) / args.dim ** 0.5).requires_grad_()
    w_proj = (torch.randn(args.dim, args.hidden, **cuda) / args.hidden ** 0.5).requires_grad_()
    w_head = (torch.randn(args.vocab, args.dim, **cuda) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens, d {args.dim}, hidden "
          f"{args.hidden}, vocab {args.vocab}, bf16; median of {args.repeats} steps")
    compare("mlp", eager_mlp, triton_mlp, (x, w_fc, w_proj), args)
    compare("loss", eager_loss, triton_loss, (x, w_head, targets), args)


if __name__ == "__main__":
    main()
