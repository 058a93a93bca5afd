"""The fused kernels as torch custom ops with autograd; Triton is imported only when one runs."""

import importlib.util
import os

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default, so the fused loss ignores the same targets


def require_triton(device: torch.device) -> None:
    """Raise the config error when Triton cannot run kernels on tensors of `device`."""
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed"
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = (f"the tensors are on {device.type} and TRITON_INTERPRET is unset (Triton runs "
                  "on CUDA devices, or on the CPU through its interpreter)")
    else:
        return
    raise ValueError(f"model.kernels = 'triton': {reason}; use model.kernels: eager here")


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
def _softcap_ce(logits: torch.Tensor, targets: torch.Tensor,
                cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton(logits.device)
    from pgolf.kernels import softcap_ce
    return softcap_ce.forward(logits.contiguous(), targets.contiguous(), cap=cap,
                              ignore_index=IGNORE_INDEX)


@_softcap_ce.register_fake
def _(logits, targets, cap):
    return logits.new_empty(logits.size(0), dtype=torch.float32), \
        logits.new_empty(logits.size(0), dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                         grad_loss: torch.Tensor, cap: float) -> torch.Tensor:
    from pgolf.kernels import softcap_ce
    return softcap_ce.backward(logits.contiguous(), targets.contiguous(), lse, grad_loss, cap=cap,
                               ignore_index=IGNORE_INDEX)


@_softcap_ce_backward.register_fake
def _(logits, targets, lse, grad_loss, cap):
    return torch.empty_like(logits)


def _softcap_ce_setup(ctx, inputs, output):
    logits, targets, ctx.cap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.set_materialize_grads(False)


def _softcap_ce_grad(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _softcap_ce_backward(logits, targets, lse, grad_loss, ctx.cap), None, None


_softcap_ce.register_autograd(_softcap_ce_grad, setup_context=_softcap_ce_setup)


def softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, cap: float,
                             reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(cap tanh(logits / cap), targets) in fp32 from raw logits (N, V) of any
    float dtype, without the capped fp32 logits in memory; cap 0 = no cap."""
    losses, _ = _softcap_ce(logits, targets, float(cap))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":  # over the targets that count, as F.cross_entropy
        return losses.sum() / (targets != IGNORE_INDEX).sum()
    raise ValueError(f"reduction = {reduction!r}: mean, sum or none")


@torch.library.custom_op("pgolf::fc_activation", mutates_args=())
def _fc_activation(x: torch.Tensor, weight: torch.Tensor,
                   slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton(x.device)
    from pgolf.kernels import mlp
    return mlp.fc_activation(x.contiguous(), weight.contiguous(), slope=slope)


@_fc_activation.register_fake
def _(x, weight, slope):
    shape = (x.size(0), weight.size(0))
    return x.new_empty(shape), x.new_empty(shape)


def _fc_activation_setup(ctx, inputs, output):
    x, weight, ctx.slope = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused pre output


def _fc_activation_grad(ctx, grad_h, grad_pre):
    x, weight, pre = ctx.saved_tensors
    # d/dpre leaky_relu(pre)^2 = 2 leaky_relu(pre) leaky_relu'(pre): 2 pre, or 2 slope^2 pre
    pre32 = pre.float()
    dpre = grad_h.float() * torch.where(pre32 > 0, 2 * pre32, 2 * ctx.slope ** 2 * pre32)
    if grad_pre is not None:  # pre is returned for saving; nothing downstream should use it
        dpre = dpre + grad_pre.float()
    dpre = dpre.to(x.dtype)
    return dpre @ weight, dpre.T @ x, None


_fc_activation.register_autograd(_fc_activation_grad, setup_context=_fc_activation_setup)


def fused_fc_activation(x: torch.Tensor, weight: torch.Tensor, *, slope: float) -> torch.Tensor:
    """leaky_relu(x W^T, slope)^2 for x (..., K) and weight (N, K), as nn.Linear then the
    activation would compute it (in the autocast dtype where autocast is on); slope 0 = relu^2."""
    dtype = torch.get_autocast_dtype(x.device.type) \
        if torch.is_autocast_enabled(x.device.type) else x.dtype
    h, _ = _fc_activation(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype), float(slope))
    return h.view(*x.shape[:-1], weight.size(0))
