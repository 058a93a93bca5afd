"""From EMA weights and Hessians to the packed artifact: quantize, pack, gate on the code bytes."""

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.io import write_json
from pgolf.model.checkpoint import read_header
from pgolf.provenance import Provenance
from pgolf.quant.artifact import OPTIONAL_CODECS, Encoded, Quantized, write_artifact
from pgolf.quant.codebytes import CHALLENGE_BYTES
from pgolf.quant.codec import entropy_bound_bytes
from pgolf.quant.gptq import GPTQConfig, dequantize, qmax
from pgolf.quant.lqer import LQERConfig, correct

# safetensors is imported where used: the exported train_gpt.py ships this module without it.


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                   bits: dict[str, int], cfg: GPTQConfig, clips: dict | None = None, *,
                   lqer: dict[str, int] | None = None, lqer_cfg: LQERConfig | None = None) -> dict:
    """GPTQ for every tensor in `bits` (at its k in `clips`, else the configured or searched k),
    with an LQER correction of rank lqer[name] (factors as lqer_cfg sets) where one is listed;
    every other tensor passes through (fp16 in the artifact)."""
    clips, lqer = clips or {}, lqer or {}
    if lqer:
        check_lqer(lqer, bits, {n: tuple(state[n].shape) for n in lqer if n in state}, lqer_cfg)
    missing = sorted(set(bits) - set(hessians))
    if missing:
        raise ValueError(f"no Hessian for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    out = {}
    for name, tensor in state.items():
        if name in bits:
            if name in clips:
                codes, scales = cfg.quantize(tensor, hessians[name], bits[name], clips[name])
            else:
                codes, scales, _ = cfg.search(tensor, hessians[name], bits[name], name)
            out[name] = Quantized(codes, scales, bits[name])
            if name in lqer:
                out[name].lqer = correct(tensor, dequantize(codes, scales), lqer_cfg, lqer[name])
        else:
            out[name] = tensor
    return out


def check_lqer(lqer: dict[str, int], bits: dict, shapes: dict, cfg: LQERConfig | None) -> None:
    """An allocation's corrections: on quantized tensors, at ranks their shapes allow."""
    if cfg is None:
        raise ValueError("the allocation lists LQER corrections, but no lqer settings were given")
    for name, rank in lqer.items():
        if name not in bits:
            raise ValueError(f"allocation: LQER correction on {name}, which it does not quantize")
        LQERConfig(rank=rank, a_bits=cfg.a_bits, b_bits=cfg.b_bits,
                   group=cfg.group).check_shapes({name: shapes[name]})


@dataclass(kw_only=True)
class PackConfig:
    limit_bytes: int = CHALLENGE_BYTES  # artifact + code bytes must not exceed this
    # Block matrices' codec: gptq, or an optional one (off by default: neither paid off on the
    # demo model, see bench/optional_codecs.py). The embedding always stays GPTQ.
    matrix_codec: str = "gptq"

    def __post_init__(self):
        if self.matrix_codec != "gptq" and self.matrix_codec not in OPTIONAL_CODECS:
            raise ValueError(f"pack.matrix_codec = {self.matrix_codec!r}: expected gptq or one "
                             f"of {sorted(OPTIONAL_CODECS)}")


def encode_optional(state: dict, hessians: dict, bits: dict[str, int], clips: dict, *,
                    codec: str, gptq: GPTQConfig) -> dict:
    """Block matrices encoded by an optional codec at their allocated bits and clip."""
    module = importlib.import_module(OPTIONAL_CODECS[codec])
    out = {}
    for name, b in bits.items():
        if name.startswith("blocks."):
            k = clips.get(name) or gptq.default_clip(b, name)
            rep = module.encode(state[name], hessians[name], bits=b, clip_sigmas=k)
            out[name] = Encoded(codec, tuple(state[name].shape), b, module.pack(rep))
    return out


def size_gate(artifact: Path, info: dict, code: dict, cfg: PackConfig) -> None:
    total = info["bytes"] + code["bytes"]
    if total <= cfg.limit_bytes:
        return
    largest = sorted(((v.get("codes", 0) + v.get("scales", 0) + v.get("bytes", 0)
                       + v.get("lqer", 0), k)
                      for k, v in info["breakdown"].items() if isinstance(v, dict)), reverse=True)
    top = ", ".join(f"{k} {n:,} B" for n, k in largest[:5])
    raise ValueError(f"artifact {artifact}: {info['bytes']:,} B + code {code['bytes']:,} B = "
                     f"{total:,} B exceeds pack.limit_bytes={cfg.limit_bytes:,} by "
                     f"{total - cfg.limit_bytes:,} B; largest tensors: {top}")


def encode_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                 bits: dict[str, int], clips: dict, *, gptq: GPTQConfig, pack: PackConfig,
                 lqer: dict[str, int] | None = None, lqer_cfg: LQERConfig | None = None,
                 where: str = "the allocation") -> dict:
    """The artifact's tensors, in the checkpoint's order: block matrices through the optional
    codec if one is configured, the other allocated tensors through GPTQ (with the LQER
    corrections of rank lqer[name] listed), the rest as they are."""
    lqer, optional = lqer or {}, {}
    if pack.matrix_codec != "gptq" and any(n.startswith("blocks.") for n in lqer):
        raise ValueError(f"pack.matrix_codec = {pack.matrix_codec!r}: LQER corrections "
                         f"({where}) apply to GPTQ tensors only; use gptq or lqer.rank: 0")
    if pack.matrix_codec != "gptq":
        optional = encode_optional(state, hessians, bits, clips, codec=pack.matrix_codec,
                                   gptq=gptq)
    # GPTQ only what the optional codec did not take
    plain = quantize_state(state, hessians, {n: b for n, b in bits.items() if n not in optional},
                           gptq, clips, lqer=lqer, lqer_cfg=lqer_cfg)
    return {n: optional.get(n, plain.get(n)) for n in state}


def build_artifact(model: Path, hessians: Path, allocation: Path, out: Path, meta_out: Path, *,
                   gptq: GPTQConfig, pack: PackConfig, code: dict,
                   lqer: LQERConfig | None = None,
                   provenance: Provenance | None = None) -> dict:
    """The artifact stage: quantize per the allocation, pack, gate on artifact + `code` bytes
    (pgolf.quant.codebytes: the exported train_gpt.py's size), write the breakdown."""
    from safetensors.torch import load_file

    alloc = json.loads(Path(allocation).read_text())
    bits = {k: int(v) for k, v in alloc["bits"].items()}
    state, H = load_file(str(model)), load_file(str(hessians))
    corrected = {n: int(r) for n, r in alloc.get("lqer", {}).items()}
    tensors = encode_state(state, H, bits, alloc.get("clip_sigmas", {}), gptq=gptq, pack=pack,
                           lqer=corrected, lqer_cfg=lqer, where=str(allocation))
    header = read_header(model)
    model_cfg = json.loads(header["config"])
    info = write_artifact(out, tensors, {"model": model_cfg,
                                         "looping": json.loads(header.get("looping", "false"))})
    bound = sum(entropy_bound_bytes(t.codes.numpy().astype(np.int64) + qmax(t.bits))
                for t in tensors.values() if isinstance(t, Quantized))
    codes_bytes = sum(info["breakdown"][n]["codes"] for n, t in tensors.items()
                      if isinstance(t, Quantized))
    lqer_bytes = sum(v.get("lqer", 0) for v in info["breakdown"].values() if isinstance(v, dict))
    predicted = alloc.get("predicted") or {}
    summary = {"policy": alloc["policy"], "artifact_bytes": info["bytes"],
               "predicted_bytes": predicted.get("bytes"),
               "predicted_dbpb": predicted.get("dbpb"), "code": code,
               "total_bytes": info["bytes"] + code["bytes"], "limit_bytes": pack.limit_bytes,
               "margin_bytes": pack.limit_bytes - info["bytes"] - code["bytes"],
               "codes_bytes": codes_bytes, "codes_entropy_bound_bytes": bound,
               **({"lqer_bytes": lqer_bytes} if corrected else {}),
               "breakdown": info["breakdown"],
               "provenance": provenance.record() if provenance else None}
    try:
        size_gate(out, info, code, pack)
    except ValueError:
        out.unlink()  # an over-budget artifact must not look complete
        raise
    write_json(meta_out, summary)
    return summary
