"""The record-family GPT: one config dataclass, every record feature a switch.

Features and their semantics follow the Parameter Golf records (baseline, R0409, the 1.0611 SOTA):
QK RMS-norm with a learned per-head q gain, partial RoPE, GQA, relu^2 / LeakyReLU^2 MLP, residual
mix with the embedding stream, LN scale 1/sqrt(i+1), U-Net skips with sigmoid gates, depth
recurrence (looped layers), GPT-J or two-lane parallel residuals, XSA, a sparse head-output gate,
a BOS-masked SmearGate, document-isolated attention, tied embeddings and a logit softcap.
"""

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pgolf.model.config import GPTConfig, quantizable_matrices  # noqa: F401 (re-exported)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap); cap 0 leaves the logits as they are."""
    return cap * torch.tanh(logits / cap) if cap else logits


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
        # Sparse head-output gate: head h's output times sigmoid(scale * gate[h] . x[:window]).
        # Zero-init, so every head starts at sigmoid(0) = 1/2.
        self.gate = nn.Parameter(torch.zeros(self.h, cfg.gate_window)) if cfg.attn_gate else None
        self.gate_scale, self.gate_window = cfg.attn_gate_scale, cfg.gate_window

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None
                ) -> torch.Tensor:
        """x: the normed block input (B, T, d); mask: None (causal), or a document mask."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.h, self.hd)
        k = self.c_k(x).view(B, T, self.hkv, self.hd)
        v = self.c_v(x).view(B, T, self.hkv, self.hd)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.gate is not None:
            logits = F.linear(x[..., :self.gate_window], self.gate.to(x.dtype))
            y = y * torch.sigmoid(self.gate_scale * logits)[..., None]
        return self.proj(y.reshape(B, T, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
           mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
    """Causal attention (B, H, T, D), within documents when `mask` is given (see
    document_mask); query heads are grouped over the key/value heads (GQA)."""
    gqa = k.size(1) != q.size(1)
    if isinstance(mask, BlockMask):
        return _flex(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


_compiled_flex = None


def _flex(cuda: bool):
    """FlexAttention: compiled on CUDA (a fused, block-sparse kernel), eager elsewhere (the
    reference implementation, which materialises the scores)."""
    global _compiled_flex
    if not cuda or torch.compiler.is_compiling():  # inside a compiled model dynamo fuses it
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def document_ids(idx: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, T) index of each token's document: the count of BOS tokens up to and including it."""
    return (idx == bos_id).cumsum(dim=1)


def document_mask(idx: torch.Tensor, bos_id: int, *, block: bool | None = None
                  ) -> torch.Tensor | BlockMask:
    """Which keys each query may see: earlier tokens of its own document (itself included).

    A boolean (B, 1, T, T) mask for SDPA, or with `block` (default: on CUDA) the same mask as a
    FlexAttention BlockMask, which skips the blocks no query of the tile may see."""
    doc = document_ids(idx, bos_id)
    B, T = idx.shape
    if idx.is_cuda if block is None else block:
        def same_document(b, h, q, kv):
            return (kv <= q) & (doc[b, q] == doc[b, kv])
        return create_block_mask(same_document, B, None, T, T, device=idx.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


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
        self.two_lane = cfg.two_lane(index)
        self.parallel = cfg.parallel_from is not None and index >= cfg.parallel_from \
            and not self.two_lane
        if self.two_lane:  # lane_k <- resid[k] lane_k + post[0, k] attn + post[1, k] mlp
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def mixed(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is None:
            return x
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def forward(self, x: torch.Tensor, x0: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        x = self.mixed(x, x0)
        h = rms_norm(x) * self.norm_scale
        if self.parallel:  # attention and MLP read the same input
            return x + self.attn_scale * self.attn(h, mask) + self.mlp_scale * self.mlp(h)
        x = x + self.attn_scale * self.attn(h, mask)
        return x + self.mlp_scale * self.mlp(rms_norm(x) * self.norm_scale)

    def lanes(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor,
              mask: torch.Tensor | BlockMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-lane parallel block: attention reads lane 0 (mixed with x0), the MLP lane 1, and
        each lane takes its own learned blend of both outputs. The mix only feeds attention:
        lane 0 itself carries on unmixed."""
        attn = self.attn_scale * self.attn(rms_norm(self.mixed(lane0, x0)) * self.norm_scale, mask)
        mlp = self.mlp_scale * self.mlp(rms_norm(lane1) * self.norm_scale)
        resid, post = self.lane_resid.to(lane0.dtype), self.lane_post.to(lane0.dtype)
        return (resid[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp,
                resid[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp)


@dataclass
class State:
    """What the network carries between virtual layers."""

    x: torch.Tensor  # the residual stream; lane 0 once the two lanes have split
    x0: torch.Tensor
    stack: list
    lane1: torch.Tensor | None = None  # lane 1 of two-lane parallel residuals, once split
    mask: torch.Tensor | BlockMask | None = None  # document isolation (document_mask)


def smear_previous(e: torch.Tensor, idx: torch.Tensor, *, weight: torch.Tensor,
                   lam: torch.Tensor, bos_id: int) -> torch.Tensor:
    """SmearGate on the raw embeddings e (B, T, d): e_t + lam sigmoid(weight . e_t[:W]) e_{t-1},
    except at BOS, so a document's first token never sees the previous document's last."""
    window = weight.size(1)
    g = lam.to(e.dtype) * torch.sigmoid(F.linear(e[:, 1:, :window], weight.to(e.dtype)))
    keep = (idx[:, 1:] != bos_id).to(e.dtype)[..., None]
    return torch.cat([e[:, :1], e[:, 1:] + g * keep * e[:, :-1]], dim=1)


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
        if cfg.smear_gate:  # zero-init: the identity at start
            self.smear_gate = nn.Parameter(torch.zeros(1, cfg.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
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
        cfg = self.cfg
        e = self.tok_emb(idx)
        if cfg.smear_gate:
            e = smear_previous(e, idx, weight=self.smear_gate, lam=self.smear_lambda,
                               bos_id=cfg.bos_id)
        x0 = rms_norm(e)
        mask = document_mask(idx, cfg.bos_id) if cfg.doc_isolation else None
        return State(x0, x0, [], mask=mask)

    def advance(self, state: "State", start: int, stop: int) -> "State":
        """Run virtual layers start..stop-1 from `state` (the residual stream, the embedding
        stream and the encoder outputs not yet consumed by skips). Positions before the encoder
        end push their outputs; each decoder position first pops one as its skip."""
        encoder, decoder = self.cfg.split(self.looping)
        sequence, n_enc = encoder + decoder, len(encoder)
        x, x0, stack, lane1, mask = state.x, state.x0, list(state.stack), state.lane1, state.mask
        for p in range(start, stop):
            two_lane = self.cfg.two_lane(sequence[p])
            if two_lane and lane1 is None:  # the lanes split before the first two-lane skip
                lane1 = x
            j = p - n_enc
            if j >= 0 and self.skip_weights is not None and j < len(self.skip_weights) and stack:
                skip = self.skip_weights[j].to(x.dtype) * stack.pop()
                if self.skip_gates is not None:  # lerp(skip, x, g) = skip + g (x - skip)
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
                else:
                    x = x + skip
            if two_lane:
                x, lane1 = self.blocks[sequence[p]].lanes(x, lane1, x0, mask)
            else:
                x = self.blocks[sequence[p]](x, x0, mask)
            if j < 0:
                stack.append(x)
        return State(x, x0, stack, lane1=lane1, mask=mask)

    def output(self, state: "State") -> torch.Tensor:
        """The LM head's input after the last virtual layer: the normalised stream, or the
        normalised mean of the two lanes."""
        x = state.x if state.lane1 is None else 0.5 * (state.x + state.lane1)
        return rms_norm(x)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, d): the LM head's input."""
        depth = len(self.cfg.layer_sequence(self.looping))
        return self.output(self.advance(self.initial_state(idx), 0, depth))

    def logits(self, hidden: torch.Tensor, capped: bool = True) -> torch.Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight.to(hidden.dtype))
        if not capped:  # the fused loss caps them
            return logits
        return softcap(logits.float(), self.cfg.logit_softcap)

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
