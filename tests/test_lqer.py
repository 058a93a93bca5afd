"""LQER and the record's quantization switches: factor packing, the correction's gain, rd paying
for it like a bit width, the artifact round trip, per-role SDClip k, int7 embeddings, errors."""

import json
import zlib

import brotli
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file, save_file

from pgolf.model.checkpoint import save_model
from pgolf.model.gpt import GPT, GPTConfig, quantizable_matrices
from pgolf.quant.allocate import (
    UniformConfig,
    build_allocation,
    damage_curves,
    rd_choice,
)
from pgolf.quant.artifact import (
    MAGIC,
    PREFIX,
    Quantized,
    dequantize_tensors,
    quantized_bytes,
    read_artifact,
    write_artifact,
)
from pgolf.quant.export import PackConfig, build_artifact, quantize_state
from pgolf.quant.gptq import GPTQConfig, dequantize, sdclip_scales, weighted_error
from pgolf.quant.lqer import LQERConfig, correct, correction, decode, encode, section_bytes
from pgolf.quant.sweep import Subset, SweepConfig, prefix_cache, swapped, sweep_matrix, window_nlls
from pgolf.runplots import CONTAINER, byte_components


def test_factors_pack_as_the_record_does_on_a_hand_example():
    # A's one scale is max|A| / 1.5; codes round A / scale onto [-2, 1]
    E = torch.tensor([[0.3, -0.9], [1.2, 0.6]])
    U, S, Vh = torch.linalg.svd(E)
    lr = correction(E, LQERConfig(rank=2, group=4))
    A = U * S
    scale = torch.tensor(float(A.abs().max()) / 1.5).half().float()
    expected = torch.clamp(torch.round(A / scale), -2, 1)
    assert torch.equal(lr.a_codes.float(), expected) and lr.a_codes.min() >= -2
    assert float(lr.a_scale) == pytest.approx(float(scale))
    # B (2 x 2) is one flattened group of 4 with the scale max / 7.5, codes on [-8, 7]
    b_scale = torch.tensor(float(Vh.abs().max()) / 7.5).half().float()
    assert lr.b_scales.shape == (1,) and float(lr.b_scales[0]) == pytest.approx(float(b_scale))
    assert torch.equal(lr.b_codes.float(), torch.clamp(torch.round(Vh / b_scale), -8, 7))


@pytest.mark.parametrize("rows,cols,rank,group", [(96, 64, 4, 64), (40, 30, 3, 7), (8, 8, 1, 1)])
def test_pack_unpack_round_trip_within_the_factor_quantization_error(rows, cols, rank, group):
    torch.manual_seed(rows)
    E = torch.randn(rows, cols)
    cfg = LQERConfig(rank=rank, group=group)
    lr = correction(E, cfg)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :rank] * S[:rank], Vh[:rank]
    A_hat, B_hat = lr.factors()
    # half a step of each factor's grid (plus the fp16 rounding of the scale, <= 2^-11 of the
    # largest value: 1.5 or 7.5 steps)
    assert (A_hat - A).abs().max() <= 0.5 * float(lr.a_scale) * 1.01
    steps = lr.b_scales.float().repeat_interleave(group)[:B.numel()].view(B.shape)
    assert ((B_hat - B).abs() <= 0.5 * steps * 1.01 + 1e-7).all()
    blob = encode(lr)
    back = decode(blob, rows=rows, cols=cols, rank=rank, a_bits=2, b_bits=4, group=group)
    assert torch.equal(back.a_codes, lr.a_codes) and torch.equal(back.b_codes, lr.b_codes)
    assert torch.equal(back.b_scales, lr.b_scales) and float(back.a_scale) == float(lr.a_scale)
    assert torch.equal(back.dequantize(), lr.dequantize()) and section_bytes(lr) == len(blob)


def test_wider_factor_grids_reconstruct_closer():
    torch.manual_seed(1)
    E = torch.randn(64, 3) @ torch.randn(3, 48)
    errors = [float((E - correction(E, LQERConfig(rank=3, a_bits=b, b_bits=b)).dequantize())
                    .norm()) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02 * float(E.norm())


def calibration(rows=96, cols=64, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(512, cols) * torch.linspace(0.2, 2.0, cols)
    return torch.randn(rows, cols) * 0.1, X.T @ X


def test_lqer_error_is_below_gptq_alone_on_a_low_rank_error():
    W0, H = calibration()
    codes, scales = GPTQConfig().quantize(W0, H, 4)
    W_hat = dequantize(codes, scales)
    W = W_hat + 0.05 * torch.randn(96, 3) @ torch.randn(3, 64)  # GPTQ's result off by rank 3
    alone = float((W - W_hat).norm())
    for bits, below in ((2, 0.7), (8, 0.02)):  # the record's int2 A is coarse; int8 is not
        fix = correct(W, W_hat, LQERConfig(rank=3, a_bits=bits, b_bits=max(bits, 4)))
        assert float((W - W_hat - fix.dequantize()).norm()) < below * alone
    # and on GPTQ's own error, where outlier columns are clipped: less error, weighted too
    W = W0.clone()
    W[:, [3, 17]] += 3.0 * torch.randn(96, 2)
    codes, scales = GPTQConfig().quantize(W, H, 4)
    W_hat = dequantize(codes, scales)
    fixed = W_hat + correct(W, W_hat, LQERConfig(rank=2)).dequantize()
    assert float((W - fixed).norm()) < 0.95 * float((W - W_hat).norm())
    assert weighted_error(W, fixed, H) < weighted_error(W, W_hat, H)


def options(name, entries):
    """Sweep rows of one matrix: (bits, lqer_rank, bytes, dbpb)."""
    return [{"matrix": name, "bits": b, "lqer_rank": r, "bytes": n, "dbpb": d,
             "noise_se": 0.0, "clip_sigmas": 1.0, "error_fro": 1.0} for b, r, n, d in entries]


def test_rd_takes_lqer_when_it_is_cheaper_per_dbpb_and_not_beyond_the_budget():
    rows = []
    for name in ("a", "b"):
        # the correction (20 B) removes more damage than a bit more (100 B) does
        rows += options(name, [(4, 0, 400, 0.10), (5, 0, 500, 0.05), (4, 4, 420, 0.04),
                               (5, 4, 520, 0.03)])
    curves = damage_curves(rows)
    assert rd_choice(curves, 840, 1) == {"a": (4, 4), "b": (4, 4)}
    assert rd_choice(curves, 819, 1) == {"a": (4, 0), "b": (4, 0)}  # 820 does not fit
    assert rd_choice(curves, 940, 1) in ({"a": (5, 4), "b": (4, 4)}, {"a": (4, 4), "b": (5, 4)})
    # a correction that saves less than its bytes buy elsewhere is left out
    rows = options("a", [(4, 0, 400, 0.10), (5, 0, 500, 0.05), (4, 4, 480, 0.09)])
    rows += options("b", [(4, 0, 400, 0.10), (5, 0, 500, 0.05), (4, 4, 480, 0.09)])
    assert rd_choice(damage_curves(rows), 900, 1) in ({"a": (5, 0), "b": (4, 0)},
                                                      {"a": (4, 0), "b": (5, 0)})


def test_lqer_curves_are_monotone_on_their_own():
    rows = options("m", [(4, 0, 4, 0.3), (5, 0, 5, 0.1), (4, 2, 6, 0.05), (5, 2, 7, 0.08)])
    curve = damage_curves(rows)["m"]
    assert [curve[o]["predicted_dbpb"] for o in ((4, 0), (5, 0), (4, 2), (5, 2))] == [
        0.3, 0.1, 0.08, 0.08]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its Hessians, and sweep rows with LQER options for every matrix."""
    root = tmp_path_factory.mktemp("lqer")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    model = GPT(cfg)
    save_model(root / "model.safetensors", model, looping=False)
    save_file({n: torch.eye(s[1]) for n, s in quantizable_matrices(cfg)},
              str(root / "hessians.safetensors"))
    rows, rng = [], np.random.default_rng(0)
    for name, (r, c) in quantizable_matrices(cfg):
        for b in (4, 6, 7, 8):
            base = {"matrix": name, "bits": b, "noise_se": 0.0, "clip_sigmas": 3.0 + b}
            rows.append({**base, "lqer_rank": 0, "bytes": r * c * b // 8,
                         "dbpb": 2.0 ** -b, "error_fro": float(rng.random())})
            rows.append({**base, "lqer_rank": 2, "bytes": r * c * b // 8 + 60,
                         "dbpb": 2.0 ** -b / 4, "error_fro": 0.0})
    pq.write_table(pa.Table.from_pylist(rows), root / "sensitivity.parquet")
    return root, cfg, rows


def test_uniform_top_k_corrects_the_largest_errors_and_rd_records_its_choice(tiny):
    root, cfg, rows = tiny
    model, table = root / "model.safetensors", root / "sensitivity.parquet"
    uniform = build_allocation(model, table, "uniform", root / "u.json",
                               cfg=UniformConfig(embed_bits=7, lqer_top_k=3))
    errors = {r["matrix"]: r["error_fro"] for r in rows
              if r["lqer_rank"] == 0 and r["bits"] == uniform["bits"][r["matrix"]]}
    assert uniform["bits"]["tok_emb.weight"] == 7
    assert uniform["lqer"] == {n: 2 for n in sorted(errors, key=errors.get)[-3:]}
    per = uniform["predicted"]["per_tensor"]
    assert {n for n, p in per.items() if p.get("lqer_rank") == 2} == set(uniform["lqer"])
    plain = build_allocation(model, table, "uniform", root / "p.json", cfg=UniformConfig())
    assert plain["lqer"] == {}
    tok = [r for r in rows if r["matrix"] == "tok_emb.weight" and r["lqer_rank"] == 0]
    int7_minus_int8 = sum(r["bytes"] * (1 if r["bits"] == 7 else -1) for r in tok
                          if r["bits"] in (7, 8))
    assert uniform["predicted"]["matrix_bytes"] == (plain["predicted"]["matrix_bytes"] + 3 * 60
                                                    + int7_minus_int8)
    with pytest.raises(ValueError, match="allocate.uniform.lqer_top_k = -1"):
        UniformConfig(lqer_top_k=-1)
    plain_rows = root / "plain.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["lqer_rank"] == 0]), plain_rows)
    with pytest.raises(ValueError, match=r"allocate.uniform.lqer_top_k = 3: .*lqer.rank > 0"):
        build_allocation(model, plain_rows, "uniform", root / "x.json",
                         cfg=UniformConfig(lqer_top_k=3))


def test_artifact_round_trip_with_lqer_tensors(tmp_path):
    W, H = calibration(rows=48, cols=40)
    codes, scales = GPTQConfig().quantize(W, H, 5)
    fix = correct(W, dequantize(codes, scales), LQERConfig(rank=3, group=16))
    tensors = {"blocks.0.mlp.fc.weight": Quantized(codes, scales, 5, fix),
               "tok_emb.weight": Quantized(codes[:8], scales[:8], 5), "gain": torch.rand(7)}
    info = write_artifact(tmp_path / "a.pgz", tensors, {"m": 1})
    data = (tmp_path / "a.pgz").read_bytes()
    assert PREFIX.unpack_from(data)[1] == 4
    loaded, meta = read_artifact(tmp_path / "a.pgz")
    got = loaded["blocks.0.mlp.fc.weight"]
    assert meta == {"m": 1} and loaded["tok_emb.weight"].lqer is None
    assert torch.equal(got.codes, codes) and torch.equal(got.lqer.a_codes, fix.a_codes)
    weights = dequantize_tensors(loaded)["blocks.0.mlp.fc.weight"]
    assert torch.equal(weights, dequantize(codes, scales) + fix.dequantize())
    parts = info["breakdown"]["blocks.0.mlp.fc.weight"]
    assert parts["lqer"] == section_bytes(fix)
    assert parts["codes"] + parts["scales"] == quantized_bytes(codes.numpy(), scales.numpy(), 5)
    total = sum(v.get("codes", 0) + v.get("scales", 0) + v.get("lqer", 0) + v.get("bytes", 0)
                for v in info["breakdown"].values() if isinstance(v, dict))
    assert total + info["breakdown"]["header"] == len(data)
    # without corrections: version 3, and the same bytes as the tensors without the field
    del tensors["blocks.0.mlp.fc.weight"]
    write_artifact(tmp_path / "b.pgz", tensors, {})
    assert PREFIX.unpack_from((tmp_path / "b.pgz").read_bytes())[1] == 3
    (tmp_path / "c.pgz").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="c.pgz"):
        read_artifact(tmp_path / "c.pgz")
    # a faulty writer (checksums made to match): a flip anywhere in the correction's section
    # (its scale, A's length, A's and B's parts) is a ValueError naming the file, or decodes to
    # codes on the grids, never another error
    size = parts["lqer"]
    for at in (-size, -size + 2, -size + 5, -size // 2, -1):
        (tmp_path / "d.pgz").write_bytes(with_flipped_byte(data, at))
        try:
            fix_read = read_artifact(tmp_path / "d.pgz")[0]["blocks.0.mlp.fc.weight"].lqer
        except ValueError as err:
            assert "d.pgz" in str(err)
            continue
        assert int(fix_read.a_codes.min()) >= -2 and int(fix_read.a_codes.max()) <= 1
        assert int(fix_read.b_codes.min()) >= -8 and int(fix_read.b_codes.max()) <= 7


def with_flipped_byte(data: bytes, at: int) -> bytes:
    """The artifact with one body byte flipped and both checksums recomputed."""
    _, version, length, _ = PREFIX.unpack_from(data)
    header = json.loads(brotli.decompress(data[PREFIX.size:PREFIX.size + length]))
    body = bytearray(data[PREFIX.size + length:])
    body[at] ^= 0x5A
    header["crc32"] = zlib.crc32(bytes(body))
    packed = brotli.compress(json.dumps(header).encode())
    return PREFIX.pack(MAGIC, version, len(packed), zlib.crc32(packed)) + packed + bytes(body)


def test_export_applies_the_allocations_corrections_at_int7(tiny, tmp_path):
    root, cfg, _ = tiny
    names = [n for n, _ in quantizable_matrices(cfg)]
    alloc = {"policy": "uniform", "bits": {n: 7 for n in names},
             "clip_sigmas": {}, "lqer": {"tok_emb.weight": 2, names[0]: 1}}
    (tmp_path / "alloc.json").write_text(json.dumps(alloc))
    lqer = LQERConfig(rank=2)
    summary = build_artifact(root / "model.safetensors", root / "hessians.safetensors",
                             tmp_path / "alloc.json", tmp_path / "a.pgz", tmp_path / "a.json",
                             gptq=GPTQConfig(), pack=PackConfig(), code={"bytes": 50_000},
                             lqer=lqer)
    loaded, _ = read_artifact(tmp_path / "a.pgz")
    assert loaded["tok_emb.weight"].lqer.rank == 2 and loaded[names[0]].lqer.rank == 1
    assert loaded[names[1]].lqer is None and loaded["tok_emb.weight"].bits == 7
    assert summary["lqer_bytes"] == sum(section_bytes(loaded[n].lqer) for n in alloc["lqer"])
    parts = byte_components(summary)  # the report's bars: corrections as their own component
    assert parts["LQER"] == summary["lqer_bytes"] and CONTAINER not in parts
    state = load_file(str(root / "model.safetensors"))
    W = state["tok_emb.weight"]
    # the int7 grid: k7 std / 63 per row
    assert torch.equal(loaded["tok_emb.weight"].scales, sdclip_scales(W, bits=7, clip_sigmas=16.0))
    emb = loaded["tok_emb.weight"]
    plain = emb.codes.float() * emb.scales.float()[:, None]
    fixed = dequantize_tensors(loaded)["tok_emb.weight"]
    assert float((W - fixed).norm()) < float((W - plain).norm())
    with pytest.raises(ValueError, match="lqer.rank = 40: above the rank 32 of blocks.0"):
        quantize_state(state, load_file(str(root / "hessians.safetensors")),
                       {names[0]: 6}, GPTQConfig(), lqer={names[0]: 40}, lqer_cfg=lqer)
    with pytest.raises(ValueError, match="pack.matrix_codec = 'sparse24'"):
        build_artifact(root / "model.safetensors", root / "hessians.safetensors",
                       tmp_path / "alloc.json", tmp_path / "b.pgz", tmp_path / "b.json",
                       gptq=GPTQConfig(), pack=PackConfig(matrix_codec="sparse24"),
                       code={"bytes": 50_000}, lqer=lqer)


def test_sweep_measures_lqer_rows_only_when_on():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2,
                          num_kv_heads=1)).eval()
    subset = Subset([(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16)))], 500)
    base = window_nlls(model, prefix_cache(model, subset, 0), 0)
    name, H, cfg = "blocks.1.mlp.fc.weight", torch.eye(32), SweepConfig(bits=[3, 7])
    plain = sweep_matrix(model, name, H, subset, base, cfg=cfg, gptq=GPTQConfig())
    off = sweep_matrix(model, name, H, subset, base, cfg=cfg, gptq=GPTQConfig(),
                       lqer=LQERConfig())
    assert off == plain and "lqer_rank" not in plain[0] and len(plain) == 2
    on = sweep_matrix(model, name, H, subset, base, cfg=cfg, gptq=GPTQConfig(),
                      lqer=LQERConfig(rank=2))
    assert [(r["bits"], r["lqer_rank"]) for r in on] == [(3, 0), (3, 2), (7, 0), (7, 2)]
    W = dict(model.named_parameters())[name].detach().clone()
    for plain_row, row in zip(on[::2], on[1::2], strict=True):
        assert {k: v for k, v in plain_row.items() if k not in ("lqer_rank", "error_fro")} == \
            plain[on.index(plain_row) // 2]
        codes, scales = GPTQConfig().quantize(W, H, row["bits"])
        W_hat = dequantize(codes, scales)
        fix = correct(W, W_hat, LQERConfig(rank=2))
        assert row["bytes"] == plain_row["bytes"] + section_bytes(fix)
        assert plain_row["error_fro"] == pytest.approx(float((W - W_hat).norm()))
        with swapped(model, {name: W_hat + fix.dequantize()}):
            nll = window_nlls(model, prefix_cache(model, subset, 0), 0)
        expected = float((nll - base).sum()) / np.log(2) / subset.num_bytes
        assert row["dbpb"] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_role_clip_sigmas_override_by_role_and_width():
    cfg = GPTQConfig(role_clip_sigmas={"mlp": {"int6": 11.5}, "attn": {"int6": 13.0},
                                       "embed": {"int7": 14.0}})
    assert cfg.default_clip(6, "blocks.3.mlp.fc.weight") == 11.5
    assert cfg.default_clip(6, "blocks.3.attn.c_q.weight") == 13.0
    assert cfg.default_clip(7, "tok_emb.weight") == 14.0
    assert cfg.default_clip(5, "blocks.3.mlp.fc.weight") == cfg.clip_sigmas[5]  # other widths
    assert cfg.default_clip(6, "tok_emb.weight") == cfg.clip_sigmas[6]
    assert GPTQConfig().default_clip(6, "blocks.0.mlp.fc.weight") == 12.85  # off by default
    W, H = calibration(rows=16, cols=32)
    codes, scales, k = cfg.search(W, H, 6, "blocks.0.mlp.proj.weight")
    expected = GPTQConfig().quantize(W, H, 6, 11.5)
    assert k == 11.5 and torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])
    with pytest.raises(ValueError, match=r"gptq.role_clip_sigmas: unknown roles \['head'\]"):
        GPTQConfig(role_clip_sigmas={"head": {"int6": 1.0}})
    with pytest.raises(ValueError, match="gptq.role_clip_sigmas.mlp.int9 = 1.0"):
        GPTQConfig(role_clip_sigmas={"mlp": {"int9": 1.0}})


@pytest.mark.parametrize("kwargs,words", [
    ({"rank": -1}, "lqer.rank = -1"), ({"a_bits": 1}, "lqer.a_bits = 1"),
    ({"b_bits": 9}, "lqer.b_bits = 9"), ({"group": 0}, "lqer.group = 0"),
])
def test_bad_lqer_settings_name_the_key(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LQERConfig(**kwargs)


def test_rank_above_a_matrix_rank_names_the_matrix():
    shapes = {"blocks.0.attn.c_k.weight": (16, 32), "blocks.0.mlp.fc.weight": (64, 32)}
    LQERConfig(rank=16).check_shapes(shapes)
    with pytest.raises(ValueError, match=r"lqer.rank = 17: above the rank 16 of "
                                         r"blocks.0.attn.c_k.weight \(16 x 32\)"):
        LQERConfig(rank=17).check_shapes(shapes)


@pytest.mark.slow
def test_dag_refuses_bad_lqer_settings_before_any_job(workflow, tmp_path, sotu_texts):
    write_jsonl(workflow.root / "d.jsonl", sotu_texts[:1])
    base = {"run": "t", "corpus": {"source": "jsonl", "path": "d.jsonl"}}  # config.yaml's model
    for extra, words in (({"lqer": {"rank": 65}},
                          "lqer.rank = 65: above the rank 64 of blocks.0.attn.c_k.weight "
                          "(64 x 128)"),
                         ({"allocate": {"uniform": {"lqer_top_k": 3}}},
                          "allocate.uniform.lqer_top_k = 3 needs lqer.rank > 0")):
        workflow.write_config({**base, **extra})
        result = workflow.run("-n", check=False)
        assert result.returncode != 0 and words in result.stdout + result.stderr
