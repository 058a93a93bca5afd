"""Muon: momentum, then an approximate orthogonalisation of the update by Newton-Schulz iteration.

For a gradient matrix G the update is ~U V^T of G's SVD (all singular values ~1), scaled by
sqrt(max(1, rows/cols)). Options as in the records: Nesterov momentum, row normalisation of the
update before Newton-Schulz (MuonEq-R), decoupled weight decay. With several ranks each matrix's
update is computed on one rank (round robin) and the updates are summed across ranks.
"""

import torch
import torch.distributed as dist

# (a, b, c) of the quintic iteration X <- a X + (b A + c A^2) X with A = X X^T (baseline, R0409).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, *, steps: int = 5, coeffs=NS_COEFFS) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of G. bf16 on GPU, fp32 on CPU."""
    a, b, c = coeffs
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide orientation: A is the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices. `momentum` may be changed per step (warm-up) through param_groups."""

    def __init__(self, params, *, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_coeffs=NS_COEFFS, row_normalize: bool = False,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coeffs=tuple(ns_coeffs), row_normalize=row_normalize,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._update(p, group) if i % world == rank else torch.zeros_like(p)
                       for i, p in enumerate(params)]
            if world > 1 and params:
                flat = torch.cat([u.flatten() for u in updates])
                dist.all_reduce(flat)  # each update is nonzero on exactly one rank
                updates = list(torch.split(flat, [p.numel() for p in params]))
            for p, update in zip(params, updates, strict=True):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-group["lr"])

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf.clone()
        if group["row_normalize"]:
            g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
        update = newton_schulz(g, steps=group["ns_steps"], coeffs=group["ns_coeffs"])
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5
