"""The upstream-equivalence harness (bench/upstream_equivalence.py) against references written here
from parameter-golf.md (no upstream checkout needed): R0409's forward pass (§6.2), GPTQ (§6.4) and
the byte count (§3.1); and the harness's own loading, name maps and comparisons."""

import base64
import importlib.util
import lzma
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("upstream_equivalence",
                                               ROOT / "bench" / "upstream_equivalence.py")
ue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ue)

TINY = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2,
            qk_gain_init=2.0, rope_dims=4, rope_train_seq_len=64, ln_scale=True,
            skip_gates=True, loop_start=1, loop_end=2, num_loops=1, parallel_from=3,
            xsa_last_n=5)


# ------------------------------------------------ R0409's forward pass, from §6.2

def rope(x, dims):
    """Half-split rotation of the first `dims` channels (B, T, H, D)."""
    T, half = x.size(1), dims // 2
    inv = 10000.0 ** (-torch.arange(0, dims, 2).float() / dims)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest], dim=-1)


def norm(t):
    """RMSNorm over the last dimension, written out."""
    return t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt()


class RefAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        d, self.H, self.Hkv = h.model_dim, h.num_heads, h.num_kv_heads
        self.D, self.rd = d // self.H, h.rope_dims
        self.c_q, self.proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, self.Hkv * self.D, bias=False)
        self.c_v = nn.Linear(d, self.Hkv * self.D, bias=False)
        self.q_gain = nn.Parameter(torch.full((self.H,), h.qk_gain_init))

    def forward(self, x):
        B, T, _ = x.shape
        q = rope(norm(self.c_q(x).view(B, T, self.H, self.D)), self.rd) * self.q_gain[:, None]
        k = rope(norm(self.c_k(x).view(B, T, self.Hkv, self.D)), self.rd)
        v = self.c_v(x).view(B, T, self.Hkv, self.D)
        group = self.H // self.Hkv
        kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(self.D)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
        vhat = F.normalize(vv, dim=-1)  # XSA: drop the component along the own value
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
        return self.proj(y.reshape(B, T, -1))


class RefBlock(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        d = h.model_dim
        self.attn = RefAttention(h)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp.proj = nn.Linear(4 * d, d, bias=False)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.s, self.parallel = 1 / math.sqrt(i + 1), i >= h.parallel_residual_start

    def forward(self, x, x0):
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        a = self.attn_scale * self.attn(norm(x) * self.s)
        if self.parallel:
            return x + a + self.mlp_scale * self.mlp_out(norm(x) * self.s)
        x = x + a
        return x + self.mlp_scale * self.mlp_out(norm(x) * self.s)

    def mlp_out(self, t):
        return self.mlp.proj(F.leaky_relu(self.mlp.fc(t), 0.5) ** 2)


class RefR0409(nn.Module):
    """§6.2 with the record's tensor names: encoder/decoder halves of the virtual layer sequence,
    U-Net skips lerp(w skip, x, sigmoid(g)), tied head, softcap 30."""

    def __init__(self, h):
        super().__init__()
        self.h, self.looping_active = h, False
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        self.blocks = nn.ModuleList(RefBlock(h, i) for i in range(h.num_layers))
        n = len(self.layers(True)) // 2
        self.skip_weights = nn.Parameter(torch.ones(n, h.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(n, h.model_dim))

    def layers(self, looping):
        h, seq = self.h, list(range(self.h.num_layers))
        if looping:
            seq = seq[:h.loop_start] + seq[h.loop_start:h.loop_end + 1] * (h.num_loops + 1) \
                + seq[h.loop_end + 1:]
        return seq

    def forward_logits(self, idx):
        seq = self.layers(self.looping_active)
        enc, dec = seq[:len(seq) // 2], seq[len(seq) // 2:]
        x = x0 = F.rms_norm(self.tok_emb(idx), (self.h.model_dim,))
        skips = []
        for i in enc:
            x = self.blocks[i](x, x0)
            skips.append(x)
        for j, i in enumerate(dec):
            if skips:
                skip = self.skip_weights[j] * skips.pop()
                x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]))
            x = self.blocks[i](x, x0)
        logits = F.rms_norm(x, (self.h.model_dim,)) @ self.tok_emb.weight.T
        return 30.0 * torch.tanh(logits / 30.0)

    def forward(self, idx, targets):
        logits = self.forward_logits(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def reference_hparams():
    return types.SimpleNamespace(**{k: v for k, v in TINY.items() if k != "parallel_from"},
                                 parallel_residual_start=TINY["parallel_from"],
                                 skip_gates_enabled=True)


@pytest.fixture
def pair(one_thread):
    h = reference_hparams()
    torch.manual_seed(0)
    ref, ours = RefR0409(h), GPT(GPTConfig(**TINY))
    ue.randomize(ref, seed=1)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=g)
    return h, ref, ours, tokens


@pytest.mark.parametrize("looping", [False, True])
def test_pgolf_gpt_is_the_r0409_forward(pair, looping):
    h, ref, ours, tokens = pair
    ue.transfer(ref, ours, ue.r0409_name_map(h))
    dlogit, dloss = ue.logit_difference(ref, ours, tokens, looping=looping)
    assert dlogit < 1e-5 and dloss < 1e-5


def test_a_broken_name_map_fails(pair):
    h, ref, ours, tokens = pair
    swap = {"attn.c_k.weight": "attn.c_v.weight", "attn.c_v.weight": "attn.c_k.weight"}
    broken = [ue.Entry(e.record, e.pgolf.replace(e.pgolf.split(".", 2)[2],
                                                 swap[e.pgolf.split(".", 2)[2]]))
              if e.pgolf.split(".", 2)[-1] in swap else e for e in ue.r0409_name_map(h)]
    ue.transfer(ref, ours, broken)
    assert ue.logit_difference(ref, ours, tokens, looping=True)[0] > 1e-3
    dropped = [e for e in ue.r0409_name_map(h) if e.record != "blocks.2.attn.q_gain"]
    with pytest.raises(ValueError, match=r"'blocks.2.attn.q_gain' is unmapped"):
        ue.transfer(ref, ours, dropped)


def test_sota_map_slices_banks_and_names_unused_rows():
    h = types.SimpleNamespace(num_layers=3, parallel_start_layer=2, skip_gates_enabled=True,
                              smear_gate_enabled=True, sparse_attn_gate_enabled=True)
    d, kv, f, n = 8, 4, 16, 3
    record = {"tok_emb.weight": torch.zeros(10, d), "skip_weights": torch.zeros(1, d),
              "skip_gates": torch.zeros(1, d), "smear_gate.weight": torch.zeros(1, 2),
              "smear_lambda": torch.zeros(1), "qo_bank": torch.zeros(2 * n, d, d),
              "kv_bank": torch.zeros(2 * n, kv, d), "mlp_up_bank": torch.zeros(n, f, d),
              "mlp_down_bank": torch.zeros(n, d, f),
              "parallel_resid_lambdas": torch.zeros(n, 2),
              "parallel_post_lambdas": torch.zeros(n, 2, 2)}
    ours = {"tok_emb.weight": torch.zeros(10, d), "skip_weights": torch.zeros(1, d),
            "skip_gates": torch.zeros(1, d), "smear_gate": torch.zeros(1, 2),
            "smear_lambda": torch.zeros(1), "blocks.2.lane_resid": torch.zeros(2),
            "blocks.2.lane_post": torch.zeros(2, 2)}
    matrices = {"attn.c_q.weight": (d, d), "attn.proj.weight": (d, d),
                "attn.c_k.weight": (kv, d), "attn.c_v.weight": (kv, d), "mlp.fc.weight": (f, d),
                "mlp.proj.weight": (d, f)}
    vectors = {"attn.q_gain": (2,), "attn_scale": (d,), "mlp_scale": (d,), "resid_mix": (2, d)}
    for i in range(n):  # the record keeps only the vectors and the gate in its blocks
        for name, shape in {**matrices, **vectors}.items():
            ours[f"blocks.{i}.{name}"] = torch.zeros(shape)
        for name, shape in vectors.items():
            record[f"blocks.{i}.{name}"] = torch.zeros(shape)
        record[f"blocks.{i}.attn.attn_gate_w"] = torch.zeros(2, 2)
        ours[f"blocks.{i}.attn.gate"] = torch.zeros(2, 2)
    entries = ue.sota_name_map(h)
    assert ue.map_errors(record, ours, entries) == []
    assert [e.index for e in entries if e.record == "qo_bank" and e.pgolf.endswith("proj.weight")] \
        == [3, 4, 5]
    partial = [e for e in entries if not (e.record == "kv_bank" and e.index == 4)]
    assert "record tensor 'kv_bank' is unmapped (rows [4])" in ue.map_errors(record, ours, partial)


# ------------------------------------------------ the SOTA forward pass, from §7.2

SOTA_TINY = dict(TINY, num_layers=6, loop_start=1, loop_end=2, parallel_from=4, xsa_last_n=6,
                 parallel_lanes=2, smear_gate=True, gate_window=3, attn_gate=True,
                 attn_gate_scale=0.5, doc_isolation=True, bos_id=1)


def ref_attention(x, w, gain, gate, h, same_doc):
    """§7.2 attention: R0409's (QK norm, partial RoPE, q gain, XSA) within documents, then each
    head's output times sigmoid(scale * gate_h . x[:window])."""
    B, T, _ = x.shape
    H, Hkv, D = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
    q = rope(norm((x @ w["q"].T).view(B, T, H, D)), h.rope_dims) * gain[:, None]
    k = rope(norm((x @ w["k"].T).view(B, T, Hkv, D)), h.rope_dims)
    v = (x @ w["v"].T).view(B, T, Hkv, D)
    kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(D)
    y = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~same_doc, float("-inf")).softmax(-1),
                     vv)
    vhat = F.normalize(vv, dim=-1)
    y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    y = y * torch.sigmoid(h.sparse_attn_gate_scale * x[..., :h.gate_window] @ gate.T)[..., None]
    return y.reshape(B, T, -1) @ w["o"].T


class RefSOTA(nn.Module):
    """§7.2 with the record's names: parameter banks, the BOS-masked SmearGate, sparse head
    gates, two lanes from parallel_start_layer (skips into lane 0, attention reads lane 0 mixed
    with x0, the MLP lane 1, mean at the end), attention within documents."""

    def __init__(self, h):
        super().__init__()
        n, d, kv = h.num_layers, h.model_dim, h.num_kv_heads * h.model_dim // h.num_heads
        self.h, self.looping_active = h, False
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        self.qo_bank, self.kv_bank = nn.Parameter(torch.zeros(2 * n, d, d)), \
            nn.Parameter(torch.zeros(2 * n, kv, d))
        self.mlp_up_bank = nn.Parameter(torch.zeros(n, 4 * d, d))
        self.mlp_down_bank = nn.Parameter(torch.zeros(n, d, 4 * d))
        self.blocks = nn.ModuleList(nn.Module() for _ in range(n))
        for b in self.blocks:
            b.attn = nn.Module()
            b.attn.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
            b.attn.attn_gate_w = nn.Parameter(torch.zeros(h.num_heads, h.gate_window))
            b.attn_scale, b.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            b.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        k = len(RefR0409.layers(self, True)) // 2
        self.skip_weights = nn.Parameter(torch.ones(k, d))
        self.skip_gates = nn.Parameter(torch.zeros(k, d))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(n, 2, 2))
        self.parallel_resid_lambdas = nn.Parameter(torch.full((n, 2), 1.1))
        self.smear_gate = nn.Linear(h.gate_window, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)  # zero w and lambda: the identity at start
        self.smear_lambda = nn.Parameter(torch.zeros(1))

    def parts(self, i, x, x0, same_doc):
        n, b, h = self.h.num_layers, self.blocks[i], self.h
        w = {"q": self.qo_bank[i], "o": self.qo_bank[n + i], "k": self.kv_bank[i],
             "v": self.kv_bank[n + i]}
        s = 1 / math.sqrt(i + 1)
        x_in = b.resid_mix[0] * x + b.resid_mix[1] * x0
        a = b.attn_scale * ref_attention(F.rms_norm(x_in, (h.model_dim,)) * s, w, b.attn.q_gain,
                                         b.attn.attn_gate_w, h, same_doc)
        def mlp(t):
            t = F.leaky_relu(F.rms_norm(t, (h.model_dim,)) * s @ self.mlp_up_bank[i].T, 0.5)
            return b.mlp_scale * (t ** 2 @ self.mlp_down_bank[i].T)
        return x_in, a, mlp

    def forward_logits(self, idx):
        h = self.h
        e = self.tok_emb(idx)
        g = self.smear_lambda * torch.sigmoid(self.smear_gate(e[:, 1:, :h.gate_window]))
        e = torch.cat([e[:, :1], e[:, 1:] + g * e[:, :-1] * (idx[:, 1:] != h.bos)[..., None]], 1)
        x = x0 = F.rms_norm(e, (h.model_dim,))
        doc = (idx == h.bos).cumsum(1)
        T = idx.size(1)
        same_doc = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T).bool().tril())[:, None]
        seq = RefR0409.layers(self, self.looping_active)
        enc, dec = seq[:len(seq) // 2], seq[len(seq) // 2:]
        skips, lane1 = [], None
        for i in enc:
            x_in, a, mlp = self.parts(i, x, x0, same_doc)
            x = x_in + a + mlp(x_in + a)
            skips.append(x)
        for j, i in enumerate(dec):
            if i >= h.parallel_start_layer and lane1 is None:
                lane1 = x
            if skips:
                x = torch.lerp(self.skip_weights[j] * skips.pop(), x,
                               torch.sigmoid(self.skip_gates[j]))
            x_in, a, mlp = self.parts(i, x, x0, same_doc)
            if lane1 is None:
                x = x_in + a + mlp(x_in + a)
                continue
            m, r, p = mlp(lane1), self.parallel_resid_lambdas[i], self.parallel_post_lambdas[i]
            x, lane1 = (r[0] * x + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a
                        + p[1, 1] * m)
        x = x if lane1 is None else 0.5 * (x + lane1)
        logits = F.rms_norm(x, (h.model_dim,)) @ self.tok_emb.weight.T
        return 30.0 * torch.tanh(logits / 30.0)

    forward = RefR0409.forward


def sota_hparams():
    t = SOTA_TINY
    return types.SimpleNamespace(
        **{k: t[k] for k in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads",
                             "qk_gain_init", "rope_dims", "loop_start", "loop_end", "num_loops",
                             "gate_window")},
        parallel_start_layer=t["parallel_from"], sparse_attn_gate_scale=t["attn_gate_scale"],
        bos=t["bos_id"], skip_gates_enabled=True, smear_gate_enabled=True,
        sparse_attn_gate_enabled=True)


@pytest.mark.parametrize("looping", [False, True])
def test_pgolf_gpt_is_the_sota_forward(one_thread, looping):
    import dataclasses
    missing = [k for k in ue.SOTA.requires if k not in {f.name for f in
                                                        dataclasses.fields(GPTConfig)}]
    if missing:
        pytest.skip(f"pgolf lacks model.{', model.'.join(missing)} (the SOTA model features)")
    h = sota_hparams()
    torch.manual_seed(0)
    ref, ours = RefSOTA(h), GPT(GPTConfig(**SOTA_TINY))
    assert ue.init_errors(ref, ours, ue.sota_name_map(h)) == []
    ue.randomize(ref, seed=1)
    ue.transfer(ref, ours, ue.sota_name_map(h))
    tokens = torch.randint(2, h.vocab_size, (2, 25), generator=torch.Generator().manual_seed(2))
    tokens[:, [0, 9]], tokens[1, 17] = h.bos, h.bos  # documents, a different split per row
    dlogit, dloss = ue.logit_difference(ref, ours, tokens, looping=looping)
    assert dlogit < 1e-5 and dloss < 1e-5


# ------------------------------------------------ GPTQ, from §6.4

def reference_gptq(w, H, clip_sigmas, clip_range, block_size=128):
    """§6.4 step by step: dead columns, damping, act-order, upper Cholesky of H^-1, SDClip
    scales from the original rows, the block loop with error feedback, codes un-permuted."""
    W, H = w.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += 0.01 * torch.diag(H).mean() * torch.eye(len(H))
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s = (clip_sigmas * w.float().std(dim=1) / clip_range).clamp_min(1e-10).half()
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, W.size(1), block_size):
        i2 = min(i1 + block_size, W.size(1))
        block, err = W[:, i1:i2].clone(), torch.zeros(W.size(0), i2 - i1)
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(block[:, j] / s.float()), -clip_range, clip_range)
            Q[:, i1 + j] = q.to(torch.int8)
            err[:, j] = (block[:, j] - q * s.float()) / Hinv[i1 + j, i1 + j]
            block[:, j:] -= err[:, j:j + 1] * Hinv[i1 + j, i1 + j:i2][None]
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], s


@pytest.mark.parametrize("bits,k", [(6, 12.85), (8, 20.0), (7, 14.0)])
def test_pgolf_gptq_is_the_record_gptq(one_thread, bits, k):
    assert ue.gptq_difference(reference_gptq, bits=bits, clip_sigmas=k) == (0, 0, 0.0)


def test_gptq_difference_sees_a_different_quantizer(one_thread):
    def round_to_nearest(w, H, clip_sigmas, clip_range):
        s = (clip_sigmas * w.std(dim=1) / clip_range).half()
        return torch.clamp(torch.round(w / s.float()[:, None]), -clip_range, clip_range), s
    assert ue.gptq_difference(round_to_nearest, bits=6, clip_sigmas=12.85)[0] > 0


# ------------------------------------------------ byte counts, from §3.1

def reference_luts(sp, vocab_size, device):
    """Per piece, counted directly: control/unknown/unused pieces are boundaries worth 0 bytes,
    byte pieces 1, others the UTF-8 length without the leading '▁', which is a flag."""
    n = max(vocab_size, sp.vocab_size())
    base, lead, boundary = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.bool), \
        torch.ones(n, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
        elif piece.startswith("\u2581"):
            lead[i], base[i] = True, len(piece[1:].encode("utf-8"))
        else:
            base[i] = len(piece.encode("utf-8"))
    return base.to(device), lead.to(device), boundary.to(device)


def test_bytelut_is_the_direct_byte_count(tokenizer_path, sotu_texts):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    bad, record_bytes, ours = ue.byte_differences(reference_luts, sp, sotu_texts[:2])
    assert bad == 0 and record_bytes == ours
    ids = sp.encode(sotu_texts[0][:2000])  # bytes charged after BOS = the decoded text's bytes
    assert ue.byte_differences(reference_luts, sp, [sotu_texts[0][:2000]])[1] == \
        len(sp.decode(ids).encode("utf-8"))


# ------------------------------------------------ loading a record's code

FAKE_RECORD = '''import os
from flash_attn_interface import flash_attn_func as fa3
class Hyperparameters:
\tgain=float(os.environ.get('GAIN','1.0'))
def log_line(items):return f"{", ".join(items)}"
TABLE = dict(
    a=1,
)
@staticmethod
def decorated():
    return 3
def attend(q, k, v):
    return fa3(q, k, v, causal=True)
try:
    import not_a_module_of_this_machine
except ImportError:
    FALLBACK = True
if __name__ == "__main__":
    raise SystemExit("the harness must not run main")
'''


RAW = {"format": lzma.FORMAT_RAW, "filters": [{"id": lzma.FILTER_LZMA2}]}
WRAPPERS = {  # compress, and the options of the wrapper's decompress call, as records ship them
    "lzma": (lzma.compress, ""),
    "lzma raw (R0409)": (lambda b: lzma.compress(b, **RAW),
                         ',format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]'),
}


@pytest.mark.parametrize("form", WRAPPERS)
def test_a_wrapped_record_is_decoded_without_running_it(tmp_path, form):
    compress, options = WRAPPERS[form]
    marker = tmp_path / "ran"
    payload = base64.b85encode(compress(FAKE_RECORD.encode())).decode()
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_text(f"import lzma as L,base64 as B\nopen({str(marker)!r}, 'w')\n"
                       f"exec(L.decompress(B.b85decode('{payload}'){options}))\n")
    assert ue.record_source(wrapper) == FAKE_RECORD and not marker.exists()
    plain = tmp_path / "plain.py"
    plain.write_text(FAKE_RECORD)
    assert ue.record_source(plain) == FAKE_RECORD


def test_load_record_runs_top_level_statements_with_the_shim(tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text(FAKE_RECORD)
    module = ue.load_record(path, {"GAIN": "5.25"})
    assert module.Hyperparameters.gain == 5.25 and module.TABLE == {"a": 1} and module.FALLBACK
    assert module.decorated.__func__() == 3
    assert ("log_line" in "".join(module.skipped)) == (sys.version_info < (3, 12))
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(
        2, 1), v.transpose(1, 2).repeat_interleave(2, 1), is_causal=True).transpose(1, 2)
    assert torch.allclose(module.attend(q, k, v), want, atol=1e-6)
    assert "flash_attn_interface" not in sys.modules


def test_varlen_shim_keeps_documents_apart():
    shim = ue.flash_shim()
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10, 10, 10], dtype=torch.int32)  # padded like the record's
    y = shim.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    for a, b in [(0, 4), (4, 10)]:
        alone = shim.flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
        assert torch.allclose(y[a:b], alone, atol=1e-6)
