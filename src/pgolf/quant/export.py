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
from pgolf.quant.gptq import GPTQConfig, qmax

# safetensors is imported where used: the exported train_gpt.py ships this module without it.


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                   bits: dict[str, int], cfg: GPTQConfig, clips: dict | None = None) -> dict:
    """GPTQ for every tensor in `bits` (at its k in `clips`, else the configured or searched k);
    every other tensor passes through (fp16 in the artifact)."""
    clips = clips or {}
    missing = sorted(set(bits) - set(hessians))
    if missing:
        raise ValueError(f"no Hessian for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    out = {}
    for name, tensor in state.items():
        if name in bits:
            if name in clips:
                codes, scales = cfg.quantize(tensor, hessians[name], bits[name], clips[name])
            else:
                codes, scales, _ = cfg.search(tensor, hessians[name], bits[name])
            out[name] = Quantized(codes, scales, bits[name])
        else:
            out[name] = tensor
    return out


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
            k = clips.get(name) or gptq.default_clip(b)
            rep = module.encode(state[name], hessians[name], bits=b, clip_sigmas=k)
            out[name] = Encoded(codec, tuple(state[name].shape), b, module.pack(rep))
    return out


def size_gate(artifact: Path, info: dict, code: dict, cfg: PackConfig) -> None:
    total = info["bytes"] + code["bytes"]
    if total <= cfg.limit_bytes:
        return
    largest = sorted(((v.get("codes", 0) + v.get("scales", 0) + v.get("bytes", 0), k)
                      for k, v in info["breakdown"].items() if isinstance(v, dict)), reverse=True)
    top = ", ".join(f"{k} {n:,} B" for n, k in largest[:5])
    raise ValueError(f"artifact {artifact}: {info['bytes']:,} B + code {code['bytes']:,} B = "
                     f"{total:,} B exceeds pack.limit_bytes={cfg.limit_bytes:,} by "
                     f"{total - cfg.limit_bytes:,} B; largest tensors: {top}")


def encode_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                 bits: dict[str, int], clips: dict, *, gptq: GPTQConfig,
                 pack: PackConfig) -> dict:
    """The artifact's tensors, in the checkpoint's order: block matrices through the optional
    codec if one is configured, the other allocated tensors through GPTQ, the rest as they are."""
    optional = {}
    if pack.matrix_codec != "gptq":
        optional = encode_optional(state, hessians, bits, clips, codec=pack.matrix_codec,
                                   gptq=gptq)
    # GPTQ only what the optional codec did not take
    plain = quantize_state(state, hessians, {n: b for n, b in bits.items() if n not in optional},
                           gptq, clips)
    return {n: optional.get(n, plain.get(n)) for n in state}


def build_artifact(model: Path, hessians: Path, allocation: Path, out: Path, meta_out: Path, *,
                   gptq: GPTQConfig, pack: PackConfig, code: dict,
                   provenance: Provenance | None = None) -> dict:
    """The artifact stage: quantize per the allocation, pack, gate on artifact + `code` bytes
    (pgolf.quant.codebytes: the exported train_gpt.py's size), write the breakdown."""
    from safetensors.torch import load_file

    alloc = json.loads(Path(allocation).read_text())
    bits = {k: int(v) for k, v in alloc["bits"].items()}
    state, H = load_file(str(model)), load_file(str(hessians))
    tensors = encode_state(state, H, bits, alloc.get("clip_sigmas", {}), gptq=gptq, pack=pack)
    header = read_header(model)
    info = write_artifact(out, tensors, {"model": json.loads(header["config"]),
                                         "looping": json.loads(header.get("looping", "false"))})
    bound = sum(entropy_bound_bytes(t.codes.numpy().astype(np.int64) + qmax(t.bits))
                for t in tensors.values() if isinstance(t, Quantized))
    codes_bytes = sum(info["breakdown"][n]["codes"] for n, t in tensors.items()
                      if isinstance(t, Quantized))
    predicted = alloc.get("predicted") or {}
    summary = {"policy": alloc["policy"], "artifact_bytes": info["bytes"],
               "predicted_bytes": predicted.get("bytes"),
               "predicted_dbpb": predicted.get("dbpb"), "code": code,
               "total_bytes": info["bytes"] + code["bytes"], "limit_bytes": pack.limit_bytes,
               "margin_bytes": pack.limit_bytes - info["bytes"] - code["bytes"],
               "codes_bytes": codes_bytes, "codes_entropy_bound_bytes": bound,
               "breakdown": info["breakdown"],
               "provenance": provenance.record() if provenance else None}
    try:
        size_gate(out, info, code, pack)
    except ValueError:
        out.unlink()  # an over-budget artifact must not look complete
        raise
    write_json(meta_out, summary)
    return summary
