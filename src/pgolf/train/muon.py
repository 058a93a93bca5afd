"""Muon: momentum, then an approximate orthogonalisation of the update by Newton-Schulz iteration.

For a gradient matrix G the update is ~U V^T of G's SVD (all singular values ~1), scaled by
sqrt(max(1, rows/cols)). Options as in the records: Nesterov momentum, row normalisation of the
update before Newton-Schulz (MuonEq-R), decoupled weight decay, per-iteration (Polar Express)
coefficients. With several ranks the work is spread in one of two ways:

- round_robin: every rank holds the all-reduced (DDP) gradients; matrix i's update is computed on
  rank i % world and the updates are summed across ranks (the baseline, R0409).
- sharded ("parallel Muon", the SOTA record): matrices of one shape form a bank; the bank's raw
  gradients are reduce-scattered (mean) so that each rank holds a contiguous shard of the bank,
  computes its shard's updates and all-gathers them. There is no DDP all-reduce of matrices.
"""

from collections import defaultdict

import torch
import torch.distributed as dist

# (a, b, c) of the quintic iteration X <- a X + (b A + c A^2) X with A = X X^T (baseline, R0409).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932, PR #1344): one minimax-optimal triple per iteration, as the
# SOTA record uses them (no safety factor, Frobenius normalisation), for at most 5 iterations.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SHARDINGS = ("round_robin", "sharded")
# torch >= 2.13 names the single-tensor collectives *_single (the old names warn). They are the
# NCCL reduce_scatter_tensor / all_gather_into_tensor; torch 2.13's gloo implements both, with
# ReduceOp.AVG, so the CPU tests run the same communication (older gloo lacks reduce-scatter).
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def iteration_coeffs(coeffs, steps: int) -> list[tuple[float, float, float]]:
    """One (a, b, c) per iteration: a single triple repeated, or a list of `steps` triples."""
    if _is_triple(coeffs):
        return [tuple(coeffs)] * steps
    if len(coeffs) != steps or not all(_is_triple(c) for c in coeffs):
        raise ValueError(f"ns_coeffs = {list(coeffs)!r}: need one (a, b, c) or {steps} of them "
                         "(one per ns_steps)")
    return [tuple(c) for c in coeffs]


def _is_triple(value) -> bool:
    return (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(v, int | float) for v in value))


def newton_schulz(G: torch.Tensor, *, steps: int = 5, coeffs=NS_COEFFS) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of G (a matrix, or a stack of them: each is
    Frobenius-normalised on its own). bf16 on GPU, fp32 on CPU."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + 1e-7) if X.ndim == 2 else X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: A is the smaller Gram matrix
        X = X.mT
    for a, b, c in iteration_coeffs(coeffs, steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices. `momentum` may be changed per step (warm-up) through param_groups.

    With sharding="sharded" and several ranks, call reduce_scatter_grads() after backward (the
    trainer does, before clipping) and do not wrap the matrices in DDP."""

    def __init__(self, params, *, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_coeffs=NS_COEFFS, row_normalize: bool = False,
                 weight_decay: float = 0.0, sharding: str = "round_robin"):
        if sharding not in SHARDINGS:
            raise ValueError(f"Muon sharding {sharding!r}: one of {SHARDINGS}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coeffs=tuple(iteration_coeffs(ns_coeffs, ns_steps)),
                        row_normalize=row_normalize, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.sharding = sharding
        self._shards = None  # per group: [(bank params, this rank's shard of their mean grads)]
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        if self.sharding == "sharded":
            return self._sharded_step()
        rank, world = _rank_world()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._update(p, p.grad, group) if i % world == rank
                       else torch.zeros_like(p) for i, p in enumerate(params)]
            if world > 1 and params:
                flat = torch.cat([u.flatten() for u in updates])
                dist.all_reduce(flat)  # each update is nonzero on exactly one rank
                updates = list(torch.split(flat, [p.numel() for p in params]))
            for p, update in zip(params, updates, strict=True):
                _apply(p, update.view_as(p), group)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        g = self._momentum_direction(p, grad, group)
        update = newton_schulz(g, steps=group["ns_steps"], coeffs=group["ns_coeffs"])
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5

    def _momentum_direction(self, p, grad, group) -> torch.Tensor:
        """Momentum (state of p), Nesterov look-ahead and the optional row normalisation."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        g = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf.clone()
        if group["row_normalize"]:
            g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
        return g

    @torch.no_grad()
    def reduce_scatter_grads(self) -> None:
        """Mean-reduce each bank's raw gradients so that this rank holds its shard of them."""
        _, world = _rank_world()
        self._shards = []
        for group in self.param_groups:
            shards = []
            for bank in _banks(group["params"]):
                padded = -(-len(bank) // world) * world  # a multiple of world: equal shards
                full = torch.zeros(padded, *bank[0].shape, dtype=bank[0].grad.dtype,
                                   device=bank[0].device)
                full[:len(bank)].copy_(torch.stack([p.grad for p in bank]))
                shard = full
                if world > 1:
                    shard = full.new_empty(padded // world, *bank[0].shape)
                    _reduce_scatter(shard, full, op=dist.ReduceOp.AVG)
                shards.append((bank, shard))
            self._shards.append(shards)

    def sharded_grads(self) -> list[torch.Tensor]:
        """This rank's shards of the mean matrix gradients (disjoint across ranks; may be scaled
        in place, e.g. by gradient clipping, before step)."""
        if self._shards is None:
            self.reduce_scatter_grads()
        return [shard for shards in self._shards for _, shard in shards]

    def _sharded_step(self) -> None:
        rank, world = _rank_world()
        if self._shards is None:
            self.reduce_scatter_grads()
        for group, shards in zip(self.param_groups, self._shards, strict=True):
            for bank, shard in shards:
                first = rank * len(shard)  # bank index of this rank's first shard row
                mine = bank[first:first + len(shard)]  # the rest of the shard is padding
                update = torch.zeros_like(shard)
                if mine:
                    g = torch.stack([self._momentum_direction(p, shard[i], group)
                                     for i, p in enumerate(mine)])
                    scale = max(1.0, g.size(-2) / g.size(-1)) ** 0.5
                    update[:len(mine)] = scale * newton_schulz(
                        g, steps=group["ns_steps"], coeffs=group["ns_coeffs"])
                full = update
                if world > 1:
                    full = torch.empty(world * len(shard), *shard.shape[1:], dtype=shard.dtype,
                                       device=shard.device)
                    _all_gather(full, update)
                for p, u in zip(bank, full, strict=False):
                    _apply(p, u, group)
        self._shards = None


def _apply(p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(update, alpha=-group["lr"])


def _banks(params) -> list[list[torch.Tensor]]:
    """Matrices with a gradient grouped by shape, in parameter order (the same on every rank)."""
    banks = defaultdict(list)
    for p in params:
        if p.grad is not None:
            banks[tuple(p.shape)].append(p)
    return list(banks.values())


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

