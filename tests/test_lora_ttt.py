"""Phased LoRA TTT (the SOTA record's eval): documents and chunk windows, the adapters against
hand-merged weights, equivalence to plain document-isolated scoring at lr 0, legality (score
before update, nothing learnt from a later document), adaptation, gloo ranks, config errors."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.config import section
from pgolf.data.bytecount import ByteLUT, target_bytes
from pgolf.eval.bpb import evaluate
from pgolf.eval.lora_ttt import Adapters, Attached
from pgolf.eval.phased import (
    Isolated,
    LoRATTTConfig,
    PhasesConfig,
    chunk_window,
    doc_batches,
    find_docs,
    phase_docs,
    phase_plan,
    phased_bpb,
)
from pgolf.model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend
CPU = torch.device("cpu")
VOCAB, SEQ = 64, 32
LUT = ByteLUT(np.random.default_rng(0).integers(1, 4, VOCAB),
              np.random.default_rng(1).random(VOCAB) < 0.5, np.arange(VOCAB) < 2)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
               rope_train_seq_len=SEQ)
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # zero-initialised projections would make the model ignore context
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def doc_stream(lengths, seed=0, repeat=None):
    """BOS + tokens per document; `repeat` makes every document a noisy repeating pattern."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        body = rng.integers(2, VOCAB, n)
        if repeat:
            body = np.tile(rng.integers(2, VOCAB, repeat), n // repeat + 1)[:n]
        parts.append(np.concatenate([[1], body]))
    return np.concatenate(parts).astype(np.int64)


def cfg(**kw):
    phases = kw.pop("phases", {"num_phases": 0})
    base = dict(chunk_size=8, rank=4, alpha=8.0, lr=0.01, batch_docs=2, warm_start_a=False)
    return section(LoRATTTConfig, {**base, **kw, "phases": phases}, "lora_ttt")


def run(model, stream, c, **kw):
    kw = {"seq_len": SEQ, "device": CPU, **kw}
    return phased_bpb(model, stream, LUT, cfg=c, **kw)


def test_documents_tile_the_targets_once():
    stream = np.array([1, 5, 6, 1, 7, 1, 1, 8, 9])
    assert find_docs(stream).tolist() == [[0, 4], [3, 3], [5, 2], [6, 3]]
    assert find_docs(np.array([3, 5, 1, 7, 1])).tolist() == [[0, 3], [2, 3]]  # no final BOS doc
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 4, 500)
    covered = np.concatenate([np.arange(s + 1, s + n) for s, n in find_docs(stream)])
    assert np.array_equal(np.sort(covered), np.arange(1, 500))


def test_chunk_windows_and_batch_order():
    # 100 targets, chunks of 48, windows of at most 64 tokens ending at the chunk's end
    assert [chunk_window(ci, 100, 48, 64) for ci in range(3)] == [
        (0, 48, 0, 48), (32, 64, 16, 48), (36, 64, 60, 4)]
    docs = np.array([[0, 5], [5, 9], [14, 2], [16, 7], [23, 3]])
    batches, queue = doc_batches(docs, 2)  # by length 2 3 | 5 7 | 9, the longest batch first
    assert [b.tolist() for b in batches] == [[2, 4], [0, 3], [1]] and queue == [2, 1, 0]
    # 3 phases at 1, 2 and 4 of 5 documents: after queue positions 0, 1 and 2
    assert phase_plan([1, 2, 2], PhasesConfig(prefix_docs=4, num_phases=3)) == [
        (0, 1), (1, 2), (2, 4)]
    # once the 9 and then 5, 7 ran, a phase of 2 documents trains on 5 and 7 (the record's
    # (batch, position) order puts the later, shorter batch first)
    assert phase_docs(batches, queue[:2], 2).tolist() == [0, 3]


def merged_copy(model, layer, name, delta):
    other = GPT(model.cfg).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        linear = getattr(other.blocks[layer].attn, name) if name != "head" else other.lm_head
        linear.weight += delta
    return other


@pytest.mark.parametrize("site", ["q", "k", "v", "head"])
def test_an_adapter_is_a_weight_change_of_its_projection(site):
    """LoRA on a projection of one document = that projection with W + (alpha/r) B A."""
    model = tiny_model(tie_embeddings=False)
    adapters = Adapters(model, 1, rank=3, alpha=6.0, seed=0, device=CPU)
    lora = adapters.head if site == "head" else adapters.sites[site][1]
    with torch.no_grad():
        lora.B.normal_()
    x = torch.from_numpy(doc_stream([40])[:SEQ])[None]
    y = torch.roll(x, -1, 1)
    delta = 2.0 * lora.B[0] @ lora.A[0]
    expect = merged_copy(model, 1, {"q": "c_q", "k": "c_k", "v": "c_v"}.get(site, "head"), delta)
    got = Attached(model, adapters)(x, y)
    torch.testing.assert_close(got, expect(x, y, reduction="none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["o", "mlp"])
def test_o_and_mlp_adapters_add_from_the_normed_input(site):
    model = tiny_model()
    adapters = Adapters(model, 1, rank=3, alpha=3.0, seed=0, device=CPU)
    lora = adapters.sites[site][0]
    with torch.no_grad():
        lora.B.normal_()
    x = torch.from_numpy(doc_stream([40])[:SEQ])[None]
    y = torch.roll(x, -1, 1)
    got = Attached(model, adapters)(x, y)
    module = model.blocks[0].attn if site == "o" else model.blocks[0].mlp
    plain = module.forward
    module.forward = lambda h, *mask: plain(h, *mask) + h @ lora.A[0].T @ lora.B[0].T  # record rule
    try:
        torch.testing.assert_close(got, model(x, y, reduction="none"), rtol=1e-5, atol=1e-5)
    finally:
        del module.forward


def test_looped_layers_get_one_slot_per_pass():
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, num_loops=2)
    model.looping = True  # virtual layers 0 1 1 1 2
    adapters = Adapters(model, 1, rank=2, alpha=2.0, seed=0, device=CPU)
    assert adapters.slots == 5
    x = torch.from_numpy(doc_stream([40])[:SEQ])[None]
    y = torch.roll(x, -1, 1)
    attached = Attached(model, adapters)
    base = attached(x, y)
    assert torch.equal(base, model(x, y, reduction="none"))  # B = 0: the plain model exactly
    outs = [base]
    for slot in (1, 2, 3):  # the three passes of layer 1: each its own adapter
        with torch.no_grad():
            adapters.reset_b()
            adapters.sites["q"][slot].B.normal_()
        outs.append(attached(x, y))
    for i in range(len(outs)):
        assert all(not torch.allclose(outs[i], other) for other in outs[i + 1:])


def isolated_reference(model, stream, num_targets, chunk_size):
    """Plain scoring: every document chunk by chunk, context the last <= SEQ tokens inside it."""
    stream = stream[:num_targets + 1]
    nll = nbytes = 0.0
    for start, n in find_docs(stream):
        for ci in range(-(-(n - 1) // chunk_size)):
            ws, wl, off, cl = chunk_window(ci, n - 1, chunk_size, SEQ)
            x = stream[start + ws:start + ws + wl]
            y = stream[start + ws + 1:start + ws + wl + 1]
            out = model(torch.from_numpy(x)[None], torch.from_numpy(y)[None], reduction="none")
            nll += out[0, off:off + cl].double().sum().item()
            nbytes += target_bytes(x[off:off + cl], y[off:off + cl], LUT).sum()
    return nll / np.log(2) / nbytes


def test_lr_zero_without_phases_is_plain_isolated_scoring():
    stream = doc_stream([70, 20, 33, 5, 90, 41])
    model = tiny_model()
    result = run(model, stream, cfg(lr=0.0, weight_decay=0.0), max_tokens=256)
    assert result["bpb"] == pytest.approx(isolated_reference(model, stream, 256, 8), rel=1e-6)
    plain = evaluate(model, stream, LUT, seq_len=SEQ, batch_seqs=4, device=CPU, max_tokens=256)
    assert (result["tokens"], result["bytes"]) == (plain["tokens"], plain["bytes"])  # targets


def test_adaptation_helps_on_a_repetitive_document():
    stream = doc_stream([400], repeat=13)
    frozen = run(tiny_model(), stream, cfg(lr=0.0))["bpb"]
    adapted = run(tiny_model(), stream, cfg(lr=0.02))["bpb"]
    assert adapted < frozen - 0.1


def per_target(result):
    return np.array(result["chunks"]["nll_nats"])


PHASED = {"prefix_docs": 4, "num_phases": 2, "lr": 0.05, "chunk_tokens": 64, "batch_seqs": 2}


def test_a_later_document_changes_no_earlier_score():
    """Batches of one document, longest first: perturbing the 3rd (after the first phase) leaves
    every target of the first two bitwise alone, and moves later ones (the phase and warm A)."""
    stream = doc_stream([150, 120, 100, 80, 60, 40], seed=3)[:513]  # 16 windows of targets
    docs = find_docs(stream)
    c = cfg(batch_docs=1, warm_start_a=True, phases=PHASED)
    changed = stream.copy()
    start, n = docs[2]
    changed[start + 1:start + n - 1] = np.random.default_rng(9).integers(2, VOCAB, n - 2)
    a, b = (per_target(run(tiny_model(), s, c, chunk_tokens=1)) for s in (stream, changed))
    earlier = np.concatenate([np.arange(s, s + m - 1) for s, m in docs[:2]])  # target index
    later = np.concatenate([np.arange(s, s + m - 1) for s, m in docs[3:]])
    assert np.array_equal(a[earlier], b[earlier])
    assert not np.allclose(a[later], b[later])


def test_a_chunk_is_scored_before_its_own_update():
    """The document cut right after chunk 3 never takes the step after chunk 3: its chunks 0..3
    score the same as in the full document, which does."""
    stream = doc_stream([200], seed=5, repeat=7)
    full = per_target(run(tiny_model(), stream, cfg(lr=0.05), chunk_tokens=1))
    cut = per_target(run(tiny_model(), stream[:1 + 4 * 8], cfg(lr=0.05), chunk_tokens=1))
    assert np.array_equal(full[:32], cut)
    frozen = per_target(run(tiny_model(), stream, cfg(lr=0.0), chunk_tokens=1))
    assert np.array_equal(frozen[:8], full[:8]) and not np.allclose(frozen[8:32], full[8:32])


def test_phases_train_on_scored_documents_only_and_document_isolated():
    model = tiny_model()
    x = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 4], [2, 3, 4, 1, 5, 6, 7, 8]])
    y = torch.roll(x, -1, 1)
    got = Isolated(model)(x, y)
    for r, cuts in ((0, [0, 2, 6, 8]), (1, [0, 3, 8])):
        for a, b in zip(cuts, cuts[1:], strict=False):
            own = model(x[r:r + 1, a:b], y[r:r + 1, a:b], reduction="none")
            torch.testing.assert_close(got[r, a:b], own[0], rtol=1e-5, atol=1e-6)
    stream = doc_stream([150, 120, 100, 80, 60, 40], seed=3)
    plain = run(tiny_model(), stream, cfg(batch_docs=1))
    phased = run(tiny_model(), stream, cfg(batch_docs=1, phases=PHASED))
    assert [p["docs"] for p in phased["phases"]] == [2, 4]
    assert all(p["steps"] > 0 for p in phased["phases"]) and phased["bpb"] != plain["bpb"]


def _rank_main(rank, path, stream, c):
    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        result = run(tiny_model(), stream, c, rank=rank, world=2, chunk_tokens=128)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: their start dominates
def test_two_gloo_ranks_match_one(tmp_path):
    stream = doc_stream([150, 120, 100, 80, 60, 40, 30], seed=3)
    c = cfg(batch_docs=2, phases=PHASED)
    one = run(tiny_model(), stream, c, chunk_tokens=128)
    path = tmp_path / "two.json"
    mp.spawn(_rank_main, args=(str(path), stream, c), nprocs=2)
    two = json.loads(path.read_text())
    assert two["chunks"]["tokens"] == one["chunks"]["tokens"] and two["bytes"] == one["bytes"]
    assert two["bpb"] == pytest.approx(one["bpb"], rel=1e-5)  # float summation order only


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"lora_ttt.rank = 0"):
        LoRATTTConfig(rank=0)
    with pytest.raises(ValueError, match=r"lora_ttt.phases.lr = -1"):
        section(LoRATTTConfig, {"phases": {"lr": -1}}, "lora_ttt")
    with pytest.raises(ValueError, match=r"lora_ttt.phases: unknown keys \['epoch'\]"):
        section(LoRATTTConfig, {"phases": {"epoch": 2}}, "lora_ttt")
    with pytest.raises(ValueError, match=r"lora_ttt.betas = \[0.9\]"):
        LoRATTTConfig(betas=[0.9])
    with pytest.raises(ValueError, match=r"lora_ttt.chunk_size = 48: must be <= the eval seq_len"):
        run(tiny_model(), doc_stream([50]), cfg(chunk_size=48))
    with pytest.raises(ValueError, match=r"lora_ttt.phases.chunk_tokens = 16: must be >= "):
        run(tiny_model(), doc_stream([50]), cfg(phases={"chunk_tokens": 16}))
