"""The record-family GPT: one config dataclass, every record feature a switch.

Features and their semantics follow the Parameter Golf records (baseline, R0409): QK RMS-norm with a
learned per-head q gain, partial RoPE, GQA, relu^2 / LeakyReLU^2 MLP, residual mix with the
embedding stream, LN scale 1/sqrt(i+1), U-Net skips with sigmoid gates, depth recurrence (looped
layers), GPT-J parallel residuals, XSA, tied embeddings and a logit softcap.
"""

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.config import GPTConfig, quantizable_matrices  # noqa: F401 (re-exported)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def kernel(cfg: GPTConfig, name: str):
    """pgolf.kernels.<name> under model.kernels: triton (imported by name: counted only then)."""
    return getattr(importlib.import_module("pgolf.kernels"), name) \
        if cfg.kernels == "triton" else None


class Rotary(nn.Module):
    """RoPE on the first `dims` channels of each head (half-split rotation); the rest stay put."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dims = cfg.rope_dims if cfg.rope_dims is not None else cfg.head_dim
        self.base, self.train_len = cfg.rope_base, cfg.rope_train_seq_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        T, rd = x.size(1), self.dims
        base = self.base
        if self.train_len < T:  # NTK-style rescale for sequences longer than training's
            base = base * (T / self.train_len) ** (rd / (rd - 2))
        inv_freq = base ** (-torch.arange(0, rd, 2, device=x.device, dtype=torch.float32) / rd)
        angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2, rest = x[..., :rd // 2], x[..., rd // 2:rd], x[..., rd:]
        x1f, x2f = x1.float(), x2.float()
        rotated = torch.cat([x1f * cos + x2f * sin, x2f * cos - x1f * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, xsa: bool):
        super().__init__()
        d, hd = cfg.model_dim, cfg.head_dim
        self.h, self.hkv, self.hd, self.xsa = cfg.num_heads, cfg.num_kv_heads, hd, xsa
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, self.hkv * hd, bias=False)
        self.c_v = nn.Linear(d, self.hkv * hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.h, self.hd)
        k = self.c_k(x).view(B, T, self.hkv, self.hd)
        v = self.c_v(x).view(B, T, self.hkv, self.hd)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.hkv != self.h)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.xsa:
            y = exclude_self_value(y, v)
        return self.proj(y.reshape(B, T, -1))


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output its component along the token's own unit value vector.

    y: (B, T, H, D), v: (B, T, Hkv, D); query heads are grouped over KV heads as in GQA.
    """
    B, T, H, D = y.shape
    Hkv = v.size(2)
    yg = y.view(B, T, Hkv, H // Hkv, D)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)  # (B, T, Hkv, 1, D)
    yg = yg - (yg * v_hat).sum(-1, keepdim=True) * v_hat
    return yg.view(B, T, H, D)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_hidden, bias=False)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.model_dim, bias=False)
        self.slope = cfg.leaky_slope if cfg.activation == "leaky_relu2" else 0.0
        self.fused = kernel(cfg, "fused_fc_activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.training:  # eval calls self.fc, so the Hessian hooks see its input
            return self.proj(self.fused(x, self.fc.weight, slope=self.slope))
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = Attention(cfg, xsa=index >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)])) \
            if cfg.resid_mix else None
        self.norm_scale = 1 / math.sqrt(index + 1) if cfg.ln_scale else 1.0
        self.parallel = cfg.parallel_from is not None and index >= cfg.parallel_from

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is not None:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.norm_scale
        if self.parallel:  # attention and MLP read the same input
            return x + self.attn_scale * self.attn(h) + self.mlp_scale * self.mlp(h)
        x = x + self.attn_scale * self.attn(h)
        return x + self.mlp_scale * self.mlp(rms_norm(x) * self.norm_scale)


@dataclass
class State:
    """What the network carries between virtual layers."""

    x: torch.Tensor
    x0: torch.Tensor
    stack: list


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.looping = False  # switched on by the trainer at the configured fraction of training
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        k = cfg.num_skips
        self.skip_weights = nn.Parameter(torch.ones(k, cfg.model_dim)) if k else None
        self.skip_gates = nn.Parameter(torch.zeros(k, cfg.model_dim)) \
            if k and cfg.skip_gates else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size,
                                                                 bias=False)
        self.fused_loss = kernel(cfg, "softcapped_cross_entropy")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.embed_init_std)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                nn.init.orthogonal_(linear.weight)
            nn.init.zeros_(block.attn.proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.proj.weight)
        if self.lm_head is not None:
            nn.init.orthogonal_(self.lm_head.weight)

    def initial_state(self, idx: torch.Tensor) -> "State":
        x0 = rms_norm(self.tok_emb(idx))
        return State(x0, x0, [])

    def advance(self, state: "State", start: int, stop: int) -> "State":
        """Run virtual layers start..stop-1 from `state` (the residual stream, the embedding
        stream and the encoder outputs not yet consumed by skips). Positions before the encoder
        end push their outputs; each decoder position first pops one as its skip."""
        encoder, decoder = self.cfg.split(self.looping)
        sequence, n_enc = encoder + decoder, len(encoder)
        x, x0, stack = state.x, state.x0, list(state.stack)
        for p in range(start, stop):
            j = p - n_enc
            if j >= 0 and self.skip_weights is not None and j < len(self.skip_weights) and stack:
                skip = self.skip_weights[j].to(x.dtype) * stack.pop()
                if self.skip_gates is not None:  # lerp(skip, x, g) = skip + g (x - skip)
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
                else:
                    x = x + skip
            x = self.blocks[sequence[p]](x, x0)
            if j < 0:
                stack.append(x)
        return State(x, x0, stack)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, d): the LM head's input."""
        depth = len(self.cfg.layer_sequence(self.looping))
        return rms_norm(self.advance(self.initial_state(idx), 0, depth).x)

    def logits(self, hidden: torch.Tensor, capped: bool = True) -> torch.Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight.to(hidden.dtype))
        if not capped:  # the fused loss caps them
            return logits
        logits = logits.float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V), or with targets the cross-entropy in nats (fp32)."""
        fused = targets is not None and self.training and self.fused_loss is not None
        logits = self.logits(self.hidden(idx), capped=not fused)
        if targets is None:
            return logits
        flat = logits.view(-1, logits.size(-1)), targets.reshape(-1)
        if fused:
            loss = self.fused_loss(*flat, cap=self.cfg.logit_softcap, reduction=reduction)
        else:
            loss = F.cross_entropy(*flat, reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)
