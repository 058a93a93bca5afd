"""Triton kernels of the softcapped cross-entropy: z = c tanh(l / c), LSE and loss per row."""

import torch
import triton
import triton.language as tl

# c tanh(l / c) = 2c sigmoid(2l / c) - c. The kernels work with z + c = 2c s, s = sigmoid(2l / c):
# a shift shared by every logit of a row cancels in lse - z_target, and sigmoid is exact at the
# tails where a tanh written through exp would overflow. dz/dl = 1 - tanh^2 = 4 s (1 - s).


@triton.jit
def _capped(logit, cap, CAPPED: tl.constexpr):
    if CAPPED:
        s = tl.sigmoid(logit * (2.0 / cap))
        return 2.0 * cap * s, 4.0 * s * (1.0 - s)
    return logit, tl.full(logit.shape, 1.0, tl.float32)


@triton.jit
def _forward_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, V, stride_row, cap, ignore_index,
                    CAPPED: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    m = -float("inf")  # running max and sum of exp(z - m): the online LSE
    total = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        logit = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        z, _ = _capped(logit, cap, CAPPED)
        z = tl.where(cols < V, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    target = tl.load(targets_ptr + row)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    z_target, _ = _capped(tl.load(base + target, mask=valid, other=0.0).to(tl.float32), cap,
                          CAPPED)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(target != ignore_index, lse - z_target, 0.0))


@triton.jit
def _backward_kernel(logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_ptr, V, stride_row,
                     stride_grad_row, cap, ignore_index, CAPPED: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    # an ignored row's loss is the constant 0: its logits get no gradient
    g = tl.where(target != ignore_index, tl.load(grad_loss_ptr + row), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        logit = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        z, dz = _capped(logit, cap, CAPPED)
        p = tl.exp(z - lse)
        grad = g * (p - tl.where(cols == target, 1.0, 0.0)) * dz
        tl.store(grad_ptr + row * stride_grad_row + cols, grad.to(grad_ptr.dtype.element_ty),
                 mask=cols < V)


def forward(logits: torch.Tensor, targets: torch.Tensor, *, cap: float, ignore_index: int,
            block_v: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and LSE (fp32) of logits (N, V) with unit column stride."""
    n, vocab = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    _forward_kernel[(n,)](logits, targets, loss, lse, vocab, logits.stride(0), float(cap or 1.0),
                          ignore_index, CAPPED=bool(cap), BLOCK_V=block_v, num_warps=4)
    return loss, lse


def backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
             grad_loss: torch.Tensor, *, cap: float, ignore_index: int,
             block_v: int = 1024) -> torch.Tensor:
    """d loss / d logits, in the logits' dtype, for upstream per-row gradients grad_loss."""
    n, vocab = logits.shape
    grad = torch.empty_like(logits)
    _backward_kernel[(n,)](logits, targets, lse, grad_loss.float().contiguous(), grad, vocab,
                           logits.stride(0), grad.stride(0), float(cap or 1.0), ignore_index,
                           CAPPED=bool(cap), BLOCK_V=block_v, num_warps=4)
    return grad
