"""Exponential moving average of all weights, kept in fp32; it replaces the weights at the end."""

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys],
                             [current[k].float() for k in keys], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        current = model.state_dict()
        model.load_state_dict({k: v.to(current[k].dtype) for k, v in self.shadow.items()})
