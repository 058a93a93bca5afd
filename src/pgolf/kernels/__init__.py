"""Fused Triton kernels of the record's training step, selected by model.kernels: triton."""

from pgolf.kernels.ops import fused_fc_activation, require_triton, softcapped_cross_entropy

__all__ = ["fused_fc_activation", "require_triton", "softcapped_cross_entropy"]
