"""Per-document LoRA adapters on a frozen GPT (the SOTA record's `BatchedTTTLoRA`).

Every document of a batch owns one slice of each adapter. Adapters sit on Q, K, V, the attention
output and the MLP output of every virtual layer (a looped layer gets one slot per pass), and on
the LM head. The O and MLP adapters are additive from the normed input of their sub-block, as the
record adds them. They attach to the existing modules by forward hooks, so the model's own code
is untouched and the adapted forward is the plain forward plus the adapter terms.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.gpt import softcap


class BatchedLoRA(nn.Module):
    """delta(x)[n] = (alpha / rank) x[n] A[n]^T B[n]^T for the n-th document's slice.

    A (docs, rank, in) starts U(+-1/sqrt(in)) from `generator`; B (docs, out, rank) starts at zero,
    so a fresh adapter leaves the model unchanged."""

    def __init__(self, docs: int, d_in: int, d_out: int, *, rank: int, alpha: float,
                 generator: torch.Generator, device: torch.device):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        a = torch.rand(docs, rank, d_in, generator=generator) * (2 * bound) - bound
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(docs, d_out, rank, device=device))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        A, B = (self.A, self.B) if rows is None else (self.A[rows], self.B[rows])
        # the scale on the rank-wide intermediate: cheaper than on the output
        return (x @ A.transpose(1, 2).to(x.dtype) * self.scale) @ B.transpose(1, 2).to(x.dtype)


class Adapters(nn.Module):
    """All adapters of one batch of `docs` documents for `model` (its current looping state)."""

    SITES = ("q", "k", "v", "o", "mlp")

    def __init__(self, model, docs: int, *, rank: int, alpha: float, seed: int,
                 device: torch.device):
        super().__init__()
        cfg = model.cfg
        d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
        self.slots = len(cfg.layer_sequence(model.looping))
        gen = torch.Generator().manual_seed(seed)
        size = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d)}

        def lora(d_in, d_out):
            return BatchedLoRA(docs, d_in, d_out, rank=rank, alpha=alpha, generator=gen,
                               device=device)
        self.sites = nn.ModuleDict({s: nn.ModuleList(lora(*size[s]) for _ in range(self.slots))
                                    for s in self.SITES})
        self.head = lora(d, cfg.vocab_size)
        self.docs = docs

    def reset_b(self) -> None:
        """Zero every B: the adapters are the identity again, A keeps what it learnt."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, BatchedLoRA):
                    module.B.zero_()


class Attached:
    """`model` with `adapters` hooked in: call it with inputs (R, T) and targets for per-token NLL.
    `rows` (R,) picks which documents' slices the rows belong to; `cols` (R, K), if given, the
    positions whose targets (R, K) are scored: the head then runs on those positions only."""

    def __init__(self, model, adapters: Adapters):
        self.model, self.adapters = model, adapters
        self.rows: torch.Tensor | None = None
        self.calls = {"attn": 0, "mlp": 0}
        self.slot = 0

    def _delta(self, site: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        return self.adapters.sites[site][slot](x, self.rows)

    def _hooks(self):
        def attn_pre(module, args):
            self.slot = self.calls["attn"]  # the pass this attention call belongs to
            self.calls["attn"] += 1

        def linear(site):
            return lambda module, args, out: out + self._delta(site, self.slot, args[0])

        def attn_out(module, args, out):
            return out + self._delta("o", self.slot, args[0])

        def mlp_out(module, args, out):
            slot = self.calls["mlp"]
            self.calls["mlp"] += 1
            return out + self._delta("mlp", slot, args[0])

        for block in self.model.blocks:
            attn = block.attn
            yield attn.register_forward_pre_hook(attn_pre)
            yield attn.register_forward_hook(attn_out)
            for site, module in (("q", attn.c_q), ("k", attn.c_k), ("v", attn.c_v)):
                yield module.register_forward_hook(linear(site))
            yield block.mlp.register_forward_hook(mlp_out)

    @contextmanager
    def hooked(self):
        handles = list(self._hooks())
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        self.rows, self.calls = rows, {"attn": 0, "mlp": 0}
        with self.hooked():
            hidden = self.model.hidden(idx)
        slots = self.adapters.slots
        assert self.calls == {"attn": slots, "mlp": slots}, (self.calls, slots)
        if cols is not None:
            hidden = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.size(-1)))
        logits = head_logits(self.model, hidden, self.adapters.head(hidden, rows))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               reduction="none").view(targets.shape)


def head_logits(model, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The model's logits (`GPT.logits`) with `delta` added before the softcap, as the record adds
    its head adapter."""
    return softcap(model.logits(hidden, capped=False).float() + delta.float(),
                   model.cfg.logit_softcap)
