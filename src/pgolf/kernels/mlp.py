"""Triton kernel of the MLP's first half: h = leaky_relu(x W^T, slope)^2, the matmul's epilogue."""

import torch
import triton
import triton.language as tl


@triton.jit
def _fc_activation_kernel(x_ptr, w_ptr, pre_ptr, h_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          slope, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          PRECISION: tl.constexpr):
    # grouped tile order: GROUP_M row tiles share each column tile of W while it is in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        # the W^T tile (BLOCK_K, BLOCK_N), read straight from the (N, K) weight
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None],
                    mask=(offs_n[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    a = tl.where(acc > 0, acc, slope * acc)  # the activation runs on the fp32 accumulator
    out = offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(pre_ptr + out, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + out, (a * a).to(h_ptr.dtype.element_ty), mask=mask)


def fc_activation(x: torch.Tensor, weight: torch.Tensor, *, slope: float, block_m: int = 128,
                  block_n: int = 128, block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, pre) for x (M, K) and weight (N, K), both contiguous and of one dtype."""
    M, K = x.shape
    N = weight.size(0)
    pre = torch.empty(M, N, device=x.device, dtype=x.dtype)
    h = torch.empty_like(pre)
    # fp32 follows torch's matmul setting (TF32 off by default) to match F.linear; bf16 and fp16
    # take Triton's default (the setting is for fp32 operands only)
    precision = None if x.dtype != torch.float32 else \
        "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fc_activation_kernel[grid](x, weight, pre, h, M, N, K, x.stride(0), weight.stride(0),
                                pre.stride(0), float(slope), BLOCK_M=block_m, BLOCK_N=block_n,
                                BLOCK_K=block_k, GROUP_M=8,
                                PRECISION=precision,
                                num_warps=8, num_stages=3)
    return h, pre
