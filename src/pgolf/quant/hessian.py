"""Hessians H = X^T X / n of the input of every quantizable matrix, from calibration batches.

Forward pre-hooks accumulate fp32 X^T X on each block matrix's input; a looped layer accumulates
on every pass, as it runs. The tied embedding is also the LM head, so its H comes from the head's
input, the final normalised hidden state (an untied head gets that one and the embedding, a
lookup, gets the identity: see below). Sums and token counts are all-reduced across ranks.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.data.loader import LoaderConfig, open_streams, to_batch
from pgolf.io import atomic_path
from pgolf.model.checkpoint import load_model
from pgolf.model.gpt import GPT, quantizable_matrices
from pgolf.provenance import Provenance
from pgolf.train.distributed import all_reduce, pick_device

# safetensors and tqdm are imported where used: the exported train_gpt.py ships this module
# without them.


def _accumulate(sums: dict, counts: dict, name: str, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.size(-1)).float()
    if name not in sums:
        sums[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        counts[name] = 0
    sums[name].addmm_(x.T, x)
    counts[name] += x.size(0)


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterable[torch.Tensor], *,
                     autocast: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """{checkpoint name: (H averaged over tokens, token count)} for every quantizable matrix."""
    sums, counts, hooks = {}, {}, []
    head = "tok_emb.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    for name, _ in quantizable_matrices(model.cfg):
        if name.startswith("blocks."):
            module = model.get_submodule(name.removesuffix(".weight"))
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: _accumulate(sums, counts, name, args[0])))
    try:
        for x in batches:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                hidden = model.hidden(x)
            _accumulate(sums, counts, head, hidden)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, total in sums.items():
        n = torch.tensor(float(counts[name]), device=total.device)
        all_reduce(total)
        all_reduce(n)
        out[name] = ((total / n).cpu(), int(n))
    if not model.cfg.tie_embeddings:
        # A lookup couples no columns: a row's error only reaches the output when its token
        # appears. Its column-space H is a multiple of I, and GPTQ on it is round-to-nearest.
        out["tok_emb.weight"] = (torch.eye(model.cfg.model_dim), out[head][1])
    return out


def save_hessians(path, hessians: dict[str, tuple[torch.Tensor, int]], meta: dict) -> None:
    """One fp32 tensor per matrix name; token counts and `meta` in the header (JSON strings)."""
    tensors = {name: H.contiguous() for name, (H, _) in hessians.items()}
    from safetensors.torch import save_file

    header = {"tokens": json.dumps({name: n for name, (_, n) in hessians.items()}),
              **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


@dataclass(kw_only=True)
class HessianConfig:
    batches: int = 64
    batch_seqs: int = 8
    device: str = "auto"


def calibrate(model: GPT, shard_dir: Path, *, cfg: HessianConfig, seq_len: int, seed: int,
              device: torch.device, progress=lambda batches: batches) -> dict:
    """collect_hessians on `cfg.batches` shuffled training batches (the stream seeded by `seed`),
    with the model in eval mode and its layers looping as they will when evaluated."""
    model.eval()
    model.looping = model.cfg.num_loops > 0  # calibrate the network that will be evaluated
    (stream,) = open_streams(LoaderConfig(sampler="shuffled", streams=1), shard_dir=shard_dir,
                             manifest=None, seq_len=seq_len, vocab_size=model.cfg.vocab_size,
                             seed=seed, streams=[0])
    batches = (to_batch(stream.draw(cfg.batch_seqs, 1.0), device)[0] for _ in range(cfg.batches))
    return collect_hessians(model, progress(batches), autocast=device.type == "cuda")


def build_hessians(model_path: Path, shard_dir: Path, out: Path, *, cfg: HessianConfig,
                   seq_len: int, seed: int, provenance: Provenance | None = None) -> dict:
    """The Hessians stage: calibrate on *training* windows (never validation), looping active."""
    from tqdm import tqdm

    device = pick_device(cfg.device, "hessian.device")
    hessians = calibrate(load_model(model_path, device), shard_dir, cfg=cfg, seq_len=seq_len,
                         seed=seed, device=device,
                         progress=lambda b: tqdm(b, total=cfg.batches, desc="calibrate"))
    meta = {"batches": cfg.batches, "batch_seqs": cfg.batch_seqs, "seq_len": seq_len,
            "provenance": provenance.record() if provenance else None}
    save_hessians(out, hessians, meta)
    return hessians
