"""Proof that pgolf's presets mean what the records mean: the records' own code against pgolf's.

    python bench/upstream_equivalence.py --upstream PATH [--records r0409,sota] [--dim 128]
        [--vocab 512] [--layers N] [--tokens 64] [--tokenizer MODEL]

PATH is a checkout of openai/parameter-golf. For each record (R0409, parameter-golf.md §6; the
1.0611 SOTA, §7) the harness loads the record's train_gpt.py on the CPU without running it: an
LZMA+base85 self-extracting wrapper is decoded, never exec'd; the source is executed one top-level
statement at a time (a statement this Python cannot compile, e.g. a 3.12-only f-string in a log
line, is skipped and named); `flash_attn_interface` is a shim over SDPA; Triton-only paths are off
through the record's own settings (FUSED_CE_ENABLED=0, eval mode). Then, one line each:

  settings   every model key of pgolf's preset against the record's hyperparameter (full size)
  init       the deterministic initial vectors (q_gain, scales, resid_mix, skips, lanes) equal
  logits     random weights copied by an explicit name map (record name -> pgolf name, banks
             sliced per layer; an unmapped name on either side is an error), max |dlogit| and
             |dloss| on the same random tokens, looping off and on (fp32; fails above 1e-4)
  gptq       the record's gptq_quantize_weight against pgolf.quant.gptq.gptq on the same W, H
  bytes      the record's build_sentencepiece_luts against pgolf's ByteLUT on a real tokenizer

Only dimensions shrink (layers, width, vocabulary); every other preset value is used as is. The
exit status is nonzero when any line fails.
"""

import argparse
import ast
import base64
import contextlib
import dataclasses
import lzma
import os
import re
import sys
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-4
R0409_DIR = "records/track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT"
SOTA_DIR = "records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"


# ---------------------------------------------------------------- loading a record's code

def record_source(path: Path) -> str:
    """The record's Python source. A self-extracting wrapper, `exec(<codec>.decompress(
    <base64>.b85decode("..."), **options))`, is decoded to the source it would run, without
    running it (the options, e.g. lzma's FORMAT_RAW filters, are read, not evaluated)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text  # not a wrapper: wrappers are plain 3.x Python
    aliases = {a.asname or a.name: a.name for node in tree.body if isinstance(node, ast.Import)
               for a in node.names}
    for node in ast.walk(tree):
        payload = _wrapped_payload(node, aliases)
        if payload is not None:
            return payload
    return text


def _brotli(data: bytes) -> bytes:
    import brotli  # only records that ship a brotli wrapper need it
    return brotli.decompress(data)


CODECS = {"lzma": lzma.decompress, "brotli": _brotli, "zlib": zlib.decompress}
DECODERS = {"b85decode": base64.b85decode, "b64decode": base64.b64decode}


def _wrapped_payload(node, aliases: dict) -> str | None:
    """The decoded text when `node` is exec(codec.decompress(base64.bXXdecode(<str>), ...))."""
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "exec" and node.args
            and isinstance(inner := node.args[0], ast.Call)):
        return None
    codec, decode = _attribute(inner.func, aliases), None
    if inner.args and isinstance(inner.args[0], ast.Call):
        decode = _attribute(inner.args[0].func, aliases)
    if codec is None or codec[1] != "decompress" or codec[0] not in CODECS or decode is None \
            or decode[1] not in DECODERS or not isinstance(inner.args[0].args[0], ast.Constant):
        return None
    options = {k.arg: _constant(k.value, aliases) for k in inner.keywords}
    data = DECODERS[decode[1]](inner.args[0].args[0].value)
    return (lzma.decompress(data, **options) if codec[0] == "lzma"
            else CODECS[codec[0]](data)).decode("utf-8")


def _attribute(node, aliases: dict) -> tuple[str, str] | None:
    """(module, name) for `alias.name` where alias was imported in the wrapper."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id in aliases:
        return aliases[node.value.id], node.attr
    return None


def _constant(node, aliases: dict):
    """A wrapper option's value: literals, lists, dicts, and the codec's upper-case constants
    (lzma.FORMAT_RAW, lzma.FILTER_LZMA2); nothing else is accepted."""
    if isinstance(node, ast.List):
        return [_constant(e, aliases) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_constant(k, aliases): _constant(v, aliases)
                for k, v in zip(node.keys, node.values, strict=True)}
    attr = _attribute(node, aliases)
    if attr is not None and attr[0] == "lzma" and attr[1].isupper():
        return getattr(lzma, attr[1])
    return ast.literal_eval(node)


CLAUSES = ("else:", "elif ", "except", "finally:")


def top_level_statements(source: str) -> list[str]:
    """Split a module into its top-level statements: a new one starts at a line in column 0
    that is not a closing bracket, a comment, a clause of a compound statement (else, except,
    ...), or the body of a preceding decorator."""
    chunks, current = [], []
    in_string = False
    for line in source.splitlines(keepends=True):
        starts = (line[:1] not in ("", " ", "\t", "\n", ")", "]", "}", "#") and not in_string
                  and not line.startswith(CLAUSES)
                  and not (current and current[-1].startswith("@")))
        if starts and current:
            chunks.append("".join(current))
            current = []
        current.append(line)
        # A column-0 line inside a triple-quoted string must not start a statement.
        in_string ^= (line.count('"""') + line.count("'''")) % 2 == 1
    if current:
        chunks.append("".join(current))
    return chunks


def flash_shim() -> types.ModuleType:
    """`flash_attn_interface` for the CPU: FA3's (B, T, H, D) layout over SDPA."""
    shim = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, causal=True, **_):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0,
                               max_seqlen_k=0, causal=True, **_):
        # q: (total, H, D); documents are the spans between consecutive cu_seqlens entries.
        ends = torch.unique(cu_seqlens_q.long())
        doc = torch.bucketize(torch.arange(q.size(0)), ends, right=True)
        mask = doc[:, None] == doc[None, :]
        if causal:
            mask = mask & torch.ones_like(mask).tril()
        y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask,
                                           enable_gqa=k.size(1) != q.size(1))
        return y[0].transpose(0, 1)

    shim.flash_attn_func = flash_attn_func
    shim.flash_attn_varlen_func = flash_attn_varlen_func
    return shim


@contextlib.contextmanager
def patched_environment(env: dict[str, str]):
    """The record's environment variables set and the flash-attention shim importable, for the
    duration; both restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in env}
    saved_mod = sys.modules.get("flash_attn_interface")
    os.environ.update(env)
    sys.modules["flash_attn_interface"] = flash_shim()
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_mod is None:
            sys.modules.pop("flash_attn_interface", None)
        else:
            sys.modules["flash_attn_interface"] = saved_mod


def load_record(path: Path, env: dict[str, str], name: str = "record") -> types.ModuleType:
    """Execute the record's top-level statements (not `main()`) in a fresh module; the names of
    statements that could not run are in `module.skipped`."""
    module = types.ModuleType(f"upstream_{name}")
    module.__file__ = str(path)
    module.skipped = []
    with patched_environment(env):
        for chunk in top_level_statements(record_source(path)):
            if chunk.startswith("if __name__"):
                continue
            try:
                exec(compile(chunk, str(path), "exec"), module.__dict__)
            except Exception as err:  # noqa: BLE001 (named in `skipped`; a use fails loudly)
                module.skipped.append(f"{chunk.splitlines()[0][:60]!r} ({type(err).__name__})")
    return module


# ---------------------------------------------------------------- the two records

@dataclass
class Setting:
    """A pgolf model key and the record's counterpart: a hyperparameter or a fixed value."""

    key: str
    record: str | None = None  # attribute of the record's Hyperparameters
    fixed: object = None  # the record's hard-wired value when it has no hyperparameter
    convert: object = None  # record value -> pgolf value


@dataclass
class RecordSpec:
    name: str
    folder: str
    preset: str
    env: dict  # the record's run command (README), with the Triton-only paths off
    settings: list
    requires: list = field(default_factory=list)  # pgolf model keys the comparison needs
    documents: bool = False  # also compare with document-isolated attention (varlen)


COMMON = [Setting("num_layers", "num_layers"), Setting("model_dim", "model_dim"),
          Setting("num_heads", "num_heads"), Setting("num_kv_heads", "num_kv_heads"),
          Setting("mlp_mult", "mlp_mult"), Setting("tie_embeddings", "tie_embeddings"),
          Setting("logit_softcap", "logit_softcap"), Setting("qk_gain_init", "qk_gain_init"),
          Setting("rope_dims", "rope_dims"), Setting("rope_base", "rope_base"),
          Setting("rope_train_seq_len", "train_seq_len"), Setting("ln_scale", "ln_scale"),
          Setting("skip_gates", "skip_gates_enabled"), Setting("loop_start", "loop_start"),
          Setting("loop_end", "loop_end"), Setting("num_loops", "num_loops"),
          Setting("xsa_last_n", "xsa_last_n"), Setting("activation", fixed="leaky_relu2"),
          Setting("leaky_slope", fixed=0.5), Setting("resid_mix", fixed=True),
          Setting("skips", fixed=True), Setting("embed_init_std", "tied_embed_init_std")]

R0409 = RecordSpec(
    name="r0409", folder=R0409_DIR, preset="configs/record-8xh100.yaml",
    env={"QK_GAIN_INIT": "5.25", "TTT_ENABLED": "1", "TTT_LR": "0.005", "TTT_EPOCHS": "3"},
    settings=COMMON + [Setting("parallel_from", "parallel_residual_start")])

SOTA = RecordSpec(
    name="sota", folder=SOTA_DIR, preset="configs/sota-8xh100.yaml",
    env={"CASEOPS_ENABLED": "1", "SMEAR_GATE_ENABLED": "1", "GATE_WINDOW": "12",
         "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5", "QK_GAIN_INIT": "5.0",
         "PARALLEL_START_LAYER": "8", "PARALLEL_FINAL_LANE": "mean", "ROPE_YARN": "0",
         "FUSED_CE_ENABLED": "0", "MATRIX_LR": "0.026", "MIN_LR": "0.1",
         "MLP_CLIP_SIGMAS": "11.5", "ATTN_CLIP_SIGMAS": "13.0", "EMBED_CLIP_SIGMAS": "14.0",
         "EMBED_BITS": "7", "GATED_ATTN_QUANT_GATE": "1"},
    settings=COMMON + [
        Setting("parallel_from", "parallel_start_layer"),
        Setting("parallel_lanes", fixed=2), Setting("smear_gate", "smear_gate_enabled"),
        Setting("gate_window", "gate_window"), Setting("attn_gate", "sparse_attn_gate_enabled"),
        Setting("attn_gate_scale", "sparse_attn_gate_scale"),
        Setting("doc_isolation", fixed=True), Setting("bos_id", fixed=1),
        # the run command's FUSED_CE_ENABLED=1 and the always-on fused MLP (this harness turns
        # the CE off only to run the record on the CPU)
        Setting("kernels", fixed="triton")],
    requires=["smear_gate", "gate_window", "bos_id", "attn_gate", "attn_gate_scale",
              "parallel_lanes", "parallel_from", "doc_isolation"],
    documents=True)

RECORDS = {"r0409": R0409, "sota": SOTA}


# ---------------------------------------------------------------- configs on both sides

@dataclass
class Dims:
    """The only values the harness changes: the model's size."""

    model_dim: int = 128
    vocab_size: int = 512
    num_layers: int | None = None  # None: the preset's


def preset_model(spec: RecordSpec, root: Path = ROOT) -> dict:
    """The preset's model section, merged over config.yaml as the pipeline merges it, with
    vocab_size from the tokenizer section; ValueError when pgolf cannot express the record."""
    from pgolf.config import load_config
    from pgolf.model.config import GPTConfig

    known = {f.name for f in dataclasses.fields(GPTConfig)}
    missing = [k for k in spec.requires if k not in known]
    if missing:
        raise ValueError(f"pgolf lacks model.{', model.'.join(missing)}")
    preset = root / spec.preset
    if not preset.exists():
        raise ValueError(f"pgolf lacks {spec.preset}")
    config = load_config(root / "config.yaml", preset)
    return {**config["model"], "vocab_size": config["tokenizer"]["vocab_size"]}


def check_settings(spec: RecordSpec, model: dict, h) -> list[str]:
    """Differences between the preset's model keys and the record's settings (full size)."""
    diffs = []
    for s in spec.settings:
        want = s.fixed if s.record is None else getattr(h, s.record)
        if s.convert is not None:
            want = s.convert(want)
        got = model.get(s.key)
        if got != want and not (isinstance(got, float | int) and isinstance(want, float | int)
                                and float(got) == float(want)):
            where = "fixed" if s.record is None else s.record.upper()
            diffs.append(f"model.{s.key}={got!r} vs {where}={want!r}")
    unknown = set(model) - {s.key for s in spec.settings} - {"vocab_size"}
    diffs += [f"model.{k}={model[k]!r} has no counterpart in the record" for k in sorted(unknown)
              if not _is_off(k, model[k])]
    return diffs


def _is_off(key: str, value) -> bool:
    # pgolf switches the record lacks are fine when off (their defaults).
    from pgolf.model.config import GPTConfig
    fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    return key in fields and value == fields[key]


def shrink(model: dict, h, dims: Dims) -> None:
    """Give the preset (in place) and the record's hyperparameters the same small size."""
    values = {"num_layers": dims.num_layers or model["num_layers"],
              "model_dim": dims.model_dim, "vocab_size": dims.vocab_size}
    model.update(values)
    for key, value in values.items():
        setattr(h, key, value)
    if hasattr(h, "embedding_dim"):  # R0409's optional factorised embedding stays off
        h.embedding_dim = dims.model_dim


# ---------------------------------------------------------------- name maps

@dataclass(frozen=True)
class Entry:
    """Record tensor `record` (row `index` of a bank, or all of it) is pgolf's `pgolf`; with
    pgolf None it is deliberately unused, for `reason`."""

    record: str
    pgolf: str | None
    index: int | None = None
    reason: str = ""


BLOCK_VECTORS = ["attn.q_gain", "attn_scale", "mlp_scale", "resid_mix"]
BLOCK_MATRICES = ["attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                  "mlp.fc.weight", "mlp.proj.weight"]


def r0409_name_map(h) -> list[Entry]:
    """R0409 (CastedLinear per block) -> pgolf: the same names."""
    entries = [Entry("tok_emb.weight", "tok_emb.weight"), Entry("skip_weights", "skip_weights")]
    if h.skip_gates_enabled:
        entries.append(Entry("skip_gates", "skip_gates"))
    for i in range(h.num_layers):
        for name in BLOCK_MATRICES + BLOCK_VECTORS:
            entries.append(Entry(f"blocks.{i}.{name}", f"blocks.{i}.{name}"))
    return entries


def sota_name_map(h) -> list[Entry]:
    """SOTA (parameter banks, model-level lane lambdas, smear gate) -> pgolf's per-block names."""
    n, lanes_from = h.num_layers, h.parallel_start_layer
    entries = [Entry("tok_emb.weight", "tok_emb.weight"), Entry("skip_weights", "skip_weights")]
    if h.skip_gates_enabled:
        entries.append(Entry("skip_gates", "skip_gates"))
    if h.smear_gate_enabled:
        entries += [Entry("smear_gate.weight", "smear_gate"),
                    Entry("smear_lambda", "smear_lambda")]
    banks = [("qo_bank", 0, "attn.c_q.weight"), ("qo_bank", n, "attn.proj.weight"),
             ("kv_bank", 0, "attn.c_k.weight"), ("kv_bank", n, "attn.c_v.weight"),
             ("mlp_up_bank", 0, "mlp.fc.weight"), ("mlp_down_bank", 0, "mlp.proj.weight")]
    for i in range(n):
        entries += [Entry(bank, f"blocks.{i}.{name}", off + i) for bank, off, name in banks]
        entries += [Entry(f"blocks.{i}.{name}", f"blocks.{i}.{name}") for name in BLOCK_VECTORS]
        if h.sparse_attn_gate_enabled:
            entries.append(Entry(f"blocks.{i}.attn.attn_gate_w", f"blocks.{i}.attn.gate"))
        two_lane = 0 < lanes_from <= i
        for lam, ours in (("parallel_resid_lambdas", "lane_resid"),
                          ("parallel_post_lambdas", "lane_post")):
            entries.append(Entry(lam, f"blocks.{i}.{ours}" if two_lane else None, i,
                                 "" if two_lane else "the record reads rows >= "
                                 "PARALLEL_START_LAYER only"))
    return entries


NAME_MAPS = {"r0409": r0409_name_map, "sota": sota_name_map}


def map_errors(record_sd: dict, pgolf_sd: dict, entries: list[Entry]) -> list[str]:
    """Every record tensor (every row of a bank) used once, every pgolf tensor made once, with
    the same shapes; the problems, as sentences naming the tensors."""
    errors, covered, made = [], {}, {}
    for e in entries:
        if e.record not in record_sd:
            errors.append(f"map names record tensor {e.record!r}, which the record lacks")
            continue
        covered.setdefault(e.record, set()).add(e.index)
        if e.pgolf is None:
            continue
        if e.pgolf not in pgolf_sd:
            errors.append(f"map names pgolf tensor {e.pgolf!r}, which pgolf lacks")
            continue
        made[e.pgolf] = made.get(e.pgolf, 0) + 1
        t = record_sd[e.record] if e.index is None else record_sd[e.record][e.index]
        if tuple(t.shape) != tuple(pgolf_sd[e.pgolf].shape):
            errors.append(f"{e.record}[{e.index}] {tuple(t.shape)} vs {e.pgolf} "
                          f"{tuple(pgolf_sd[e.pgolf].shape)}")
    for name, t in record_sd.items():
        rows = covered.get(name, set())
        if rows != {None} and rows != set(range(len(t))):
            errors.append(f"record tensor {name!r} is unmapped"
                          + (f" (rows {sorted(set(range(len(t))) - rows)})" if rows else ""))
    errors += [f"pgolf tensor {k!r} is unmapped" for k in pgolf_sd if made.get(k, 0) != 1]
    return errors


def transfer(record_model, pgolf_model, entries: list[Entry]) -> None:
    """Copy the record's weights into pgolf's model by the map; ValueError on any gap."""
    record_sd, pgolf_sd = record_model.state_dict(), pgolf_model.state_dict()
    errors = map_errors(record_sd, pgolf_sd, entries)
    if errors:
        raise ValueError("name map: " + "; ".join(errors))
    state = {}
    for e in entries:
        if e.pgolf is not None:
            t = record_sd[e.record] if e.index is None else record_sd[e.record][e.index]
            state[e.pgolf] = t.detach().clone().to(pgolf_sd[e.pgolf].dtype)
    pgolf_model.load_state_dict(state, strict=True)


MATRIX = re.compile(r"(tok_emb|lm_head|_bank|c_q|c_k|c_v|\.proj|\.fc)\.?")


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Weights unlike the initialisation (zero projections would hide whole layers): matrices
    N(0, 1/fan_in), everything else its initial value plus N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if MATRIX.search(name):
            p.copy_(noise / p.shape[-1] ** 0.5)
        else:
            p.add_(0.3 * noise)


def init_errors(record_model, pgolf_model, entries: list[Entry]) -> list[str]:
    """The deterministic initial vectors (not the random matrices) agree."""
    record_sd, pgolf_sd = record_model.state_dict(), pgolf_model.state_dict()
    errors = []
    for e in entries:
        if e.pgolf is None or MATRIX.search(e.record):
            continue
        t = record_sd[e.record] if e.index is None else record_sd[e.record][e.index]
        if not torch.equal(t.float(), pgolf_sd[e.pgolf].float()):
            errors.append(f"{e.record} vs {e.pgolf}")
    return errors


# ---------------------------------------------------------------- comparisons

@dataclass
class Line:
    text: str
    ok: bool

    def __str__(self):
        return f"{self.text}  {'ok' if self.ok else 'FAIL'}"


def document_kwargs(record_module, tokens: torch.Tensor, bos_id: int) -> dict:
    """The record's varlen arguments for one packed row: a document starts at every BOS."""
    starts = (tokens[0] == bos_id).nonzero().flatten().tolist()
    cu, max_len = record_module._build_cu_seqlens(starts, tokens.size(1), tokens.device)
    return {"cu_seqlens": cu, "max_seqlen": max_len}


@torch.no_grad()
def logit_difference(record_model, pgolf_model, tokens: torch.Tensor, *, looping: bool,
                     record_kwargs: dict | None = None) -> tuple[float, float]:
    """max |dlogit| and |dloss| of the two models on the same tokens (next-token targets)."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    kwargs = record_kwargs or {}
    record_model.eval()
    pgolf_model.eval()
    record_model.looping_active = looping
    pgolf_model.looping = looping
    rec_logits = record_model.forward_logits(x, **kwargs).float()
    rec_loss = record_model(x, y, **kwargs).float()
    ours = pgolf_model(x).float()
    our_loss = pgolf_model(x, y).float()
    return float((rec_logits - ours).abs().max()), float((rec_loss - our_loss).abs())


def gptq_difference(record_gptq, *, bits: int, clip_sigmas: float, rows: int = 48,
                    cols: int = 200, seed: int = 0) -> tuple[int, int, float]:
    """(codes that differ, max |dcode|, max |dscale|) of the record's GPTQ and pgolf's on the
    same W and H (H from correlated inputs, one dead column, a partial last block)."""
    from pgolf.quant.gptq import gptq

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.2)
    X = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g).div(
        cols ** 0.5).add(torch.eye(cols))
    X[:, 5] = 0  # a dead input: H_55 = 0
    H = X.T @ X / len(X)
    rec_q, rec_s = record_gptq(W, H, clip_sigmas=clip_sigmas, clip_range=2 ** (bits - 1) - 1)
    codes, scale = gptq(W, H, bits=bits, clip_sigmas=clip_sigmas)
    dq = (rec_q.int() - codes.int()).abs()
    return int((dq > 0).sum()), int(dq.max()), float((rec_s.float() - scale.float()).abs().max())


def byte_differences(record_luts, sp, texts: list[str]) -> tuple[int, int, int]:
    """(token ids whose entries differ, record's stream bytes, pgolf's) for the record's
    build_sentencepiece_luts and pgolf's ByteLUT on the same tokenizer and documents."""
    from pgolf.data.bytecount import ByteLUT, count_bytes

    size = sp.vocab_size()
    base, lead, boundary = (t.cpu().numpy() for t in record_luts(sp, size, torch.device("cpu")))
    lut = ByteLUT.from_tokenizer(sp, size)
    bad = ((base.astype(np.int64) != lut.base_bytes) | (lead != lut.has_leading_space)
           | (boundary != lut.is_boundary))
    stream = np.concatenate([[sp.bos_id()] + sp.encode(t) for t in texts]).astype(np.int64)
    prev, tgt = stream[:-1], stream[1:]
    record_bytes = int((base[tgt].astype(np.int64) + (lead[tgt] & ~boundary[prev])).sum())
    ours = int(count_bytes(tgt, lut, prev=int(prev[0])).sum())
    return int(bad.sum()), record_bytes, ours


# ---------------------------------------------------------------- one record end to end

def build_pair(spec: RecordSpec, module, model: dict, dims: Dims, seed: int):
    """The record's model and pgolf's at the same small size (init vectors checked), then the
    same random weights in both."""
    from pgolf.config import section
    from pgolf.model.gpt import GPT, GPTConfig

    h = module.Hyperparameters()
    shrink(model, h, dims)
    torch.manual_seed(seed)
    record_model = module.GPT(h).float()
    pgolf_model = GPT(section(GPTConfig, model, "model")).float()
    entries = NAME_MAPS[spec.name](h)
    map_problems = map_errors(record_model.state_dict(), pgolf_model.state_dict(), entries)
    if map_problems:
        raise ValueError("name map: " + "; ".join(map_problems))
    init = init_errors(record_model, pgolf_model, entries)
    randomize(record_model, seed)
    transfer(record_model, pgolf_model, entries)
    return record_model, pgolf_model, init


def model_lines(spec: RecordSpec, module, pgolf_root: Path, dims: Dims, n_tokens: int,
                seed: int) -> list[Line]:
    name = spec.name
    try:
        model = preset_model(spec, pgolf_root)
    except ValueError as err:
        return [Line(f"{name}: {err}", False)]
    diffs = check_settings(spec, model, module.Hyperparameters())
    lines = [Line(f"{name} settings  {len(spec.settings)} keys"
                  + (": " + "; ".join(diffs) if diffs else " equal"), not diffs)]
    try:
        record_model, pgolf_model, init = build_pair(spec, module, model, dims, seed)
    except (ValueError, TypeError, AttributeError) as err:
        return lines + [Line(f"{name} models: {err}", False)]
    lines.append(Line(f"{name} init  " + ("; ".join(init) if init else "vectors equal"),
                      not init))
    g = torch.Generator().manual_seed(seed + 1)
    rows = 1 if spec.documents else 2
    tokens = torch.randint(0, dims.vocab_size, (rows, n_tokens + 1), generator=g)
    kwargs = None
    if spec.documents:  # three documents in one packed row, as the record trains
        module.BOS_ID = model["bos_id"]
        tokens[0, [0, n_tokens // 3, 2 * n_tokens // 3]] = model["bos_id"]
        kwargs = document_kwargs(module, tokens[:, :-1], model["bos_id"])
    for looping in (False, True):
        dlogit, dloss = logit_difference(record_model, pgolf_model, tokens, looping=looping,
                                         record_kwargs=kwargs)
        lines.append(Line(f"{name} logits looping={'on ' if looping else 'off'} "
                          f"max|dlogit| {dlogit:.1e}  dloss {dloss:.1e}",
                          dlogit <= LOGIT_TOL))
    return lines


GPTQ_CASES = {"r0409": [(6, 12.85), (8, 20.0)], "sota": [(6, 11.5), (6, 13.0), (7, 14.0)]}


def quant_lines(spec: RecordSpec, module, sp, texts) -> list[Line]:
    lines = []
    for bits, k in GPTQ_CASES[spec.name]:
        n_diff, dmax, dscale = gptq_difference(module.gptq_quantize_weight, bits=bits,
                                               clip_sigmas=k)
        lines.append(Line(f"{spec.name} gptq int{bits} k={k}  codes differing {n_diff} "
                          f"(max {dmax})  max|dscale| {dscale:.1e}", n_diff == 0 and dscale == 0))
    if sp is not None:
        bad, rec, ours = byte_differences(module.build_sentencepiece_luts, sp, texts)
        lines.append(Line(f"{spec.name} bytes  {bad} token ids differ; stream bytes record "
                          f"{rec} pgolf {ours}", bad == 0 and rec == ours))
    return lines


def record_lines(spec: RecordSpec, upstream: Path, pgolf_root: Path, dims: Dims,
                 n_tokens: int, sp, texts, seed: int = 0) -> list[Line]:
    path = upstream / spec.folder / "train_gpt.py"
    if not path.exists():
        return [Line(f"{spec.name}: no {path}", False)]
    module = load_record(path, spec.env, spec.name)
    lines = [Line(f"{spec.name} loaded {spec.folder}/train_gpt.py"
                  + (f" (skipped: {', '.join(module.skipped)})" if module.skipped else ""),
                  hasattr(module, "GPT"))]
    return lines + model_lines(spec, module, pgolf_root, dims, n_tokens, seed) \
        + quant_lines(spec, module, sp, texts)


# ---------------------------------------------------------------- command line

def tokenizer(path: str | None, workdir: Path):
    """The given SentencePiece model, or a tiny one trained with pgolf's upstream options on
    the bundled corpus; and some documents to count bytes on."""
    import sentencepiece as spm

    from pgolf.data.corpus import read_jsonl
    from pgolf.data.tokenizer import TokenizerConfig, train_tokenizer

    texts = []
    for text in read_jsonl(ROOT / "data" / "sotu.jsonl.xz"):
        texts.append(text)
        if len(texts) == 12:
            break
    if path is None:
        path = workdir / "tiny.model"
        train_tokenizer(texts[2:], path, cfg=TokenizerConfig(vocab_size=384))
    return spm.SentencePieceProcessor(model_file=str(path)), texts[:2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, type=Path,
                   help="a checkout of openai/parameter-golf")
    p.add_argument("--records", default="r0409,sota", help="comma-separated: r0409, sota")
    p.add_argument("--pgolf-root", type=Path, default=ROOT,
                   help="where config.yaml and configs/ live (default: this checkout)")
    p.add_argument("--dim", type=int, default=128, help="model_dim of both models")
    p.add_argument("--vocab", type=int, default=512, help="vocab_size of both models")
    p.add_argument("--layers", type=int, default=None, help="num_layers (default: the preset's)")
    p.add_argument("--tokens", type=int, default=64, help="sequence length of the random tokens")
    p.add_argument("--tokenizer", default=None, help="a SentencePiece .model for the byte check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    dims = Dims(model_dim=args.dim, vocab_size=args.vocab, num_layers=args.layers)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        sp, texts = tokenizer(args.tokenizer, Path(tmp))
        for name in args.records.split(","):
            if name not in RECORDS:
                raise SystemExit(f"--records: unknown record {name!r}; known: {list(RECORDS)}")
            for line in record_lines(RECORDS[name], args.upstream, args.pgolf_root, dims,
                                     args.tokens, sp, texts):
                print(line, flush=True)
                ok &= line.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
