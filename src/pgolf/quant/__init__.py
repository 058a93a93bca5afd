"""Quantization: Hessians, the GPTQ kernel, allocation and packing."""
