"""Import an upstream record's checkpoint (final_model.pt, a torch state dict) as a pgolf
model.safetensors, renaming and slicing its tensors into pgolf's per-layer names."""

import re
from pathlib import Path

import torch

from pgolf.io import sha256_file
from pgolf.model.checkpoint import save_model
from pgolf.model.gpt import GPT, GPTConfig

# The baseline and R0409 already use pgolf's names (blocks.{i}.attn.c_q.weight, tok_emb.weight,
# skip_weights, ...). The SOTA record keeps its matrices in banks, rows = layers (parameter-golf.md
# §7.2): qo_bank (2L, d, d) is Q of layers 0..L-1 then O; kv_bank (2L, kv, d) K then V.
BANKS = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight",),
    "mlp_down_bank": ("mlp.proj.weight",),
}
# The record's global lane lambdas (L, 2) and (L, 2, 2), one row per layer. Rows of single-lane
# layers get no gradient; AdamW's weight decay only scales them, so their entries stay equal.
LANES = {"parallel_resid_lambdas": "lane_resid", "parallel_post_lambdas": "lane_post"}
RENAMES = {"smear_gate.weight": "smear_gate"}  # a CastedLinear(W, 1) upstream, (1, W) either way
BLOCK_RENAMES = {"attn.attn_gate_w": "attn.gate"}  # the sparse head-output gate (heads, W)
BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
ROTARY = re.compile(r"blocks\.\d+\.attn\.rotary\.inv_freq")  # a constant of the RoPE settings


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read with weights_only=True: tensors and plain
    containers only, so a pickled object is refused instead of run."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for objects, RuntimeError for non-torch files
        raise ValueError(f"checkpoint {path}: refused by torch.load(weights_only=True), not a "
                         f"plain state dict of tensors ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint {path}: expected a dict of tensor names to tensors, got "
                         f"{type(state).__name__}")
    return state


def two_lane_layers(cfg) -> set[int]:
    """Layers with two residual lanes: from model.parallel_from on, where model.parallel_lanes
    is set (the SOTA feature branch's keys; today's GPTConfig has neither lanes nor the key)."""
    start = getattr(cfg, "parallel_from", None)
    if not getattr(cfg, "parallel_lanes", False) or start is None:
        return set()
    return set(range(start, cfg.num_layers))


def unbank(name: str, tensor: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """A bank's rows as per-layer matrices: part p of layer i is row p * num_layers + i."""
    parts, layers = BANKS[name], cfg.num_layers
    if tensor.ndim != 3 or tensor.shape[0] != len(parts) * layers:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {len(parts)} x "
                         f"model.num_layers = {len(parts) * layers} rows of matrices")
    return {f"blocks.{i}.{part}": tensor[p * layers + i]
            for p, part in enumerate(parts) for i in range(layers)}


def split_lanes(name: str, tensor: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """Rows of the two-lane layers become blocks.{i}.lane_*; any other row must be untrained
    (one value throughout: its init, 1.1 or 1, times weight decay), or the config leaves out
    lanes the record trained."""
    target = LANES[name]
    if tensor.ndim < 1 or tensor.shape[0] != cfg.num_layers:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected one row per layer "
                         f"(model.num_layers = {cfg.num_layers})")
    lanes = two_lane_layers(cfg)
    trained = [i for i in range(cfg.num_layers)
               if i not in lanes and not torch.all(tensor[i] == tensor[i].flatten()[0])]
    if trained:
        raise ValueError(f"{name}: rows {trained} were trained (unequal entries), but the config "
                         f"gives those layers one lane (model.parallel_lanes, model.parallel_from)")
    return {f"blocks.{i}.{target}": tensor[i] for i in sorted(lanes)}


def to_pgolf(state: dict[str, torch.Tensor], cfg) -> tuple[dict[str, torch.Tensor],
                                                        dict[str, str], list[str]]:
    """pgolf-named tensors from upstream-named ones, the upstream tensor each came from, and the
    upstream names no rule knows."""
    mapped, origin, unknown = {}, {}, []
    for name, tensor in state.items():
        block = BLOCK.fullmatch(name)
        if name in BANKS or name in LANES:
            split = unbank if name in BANKS else split_lanes
            pieces = split(name, tensor, cfg)
        elif ROTARY.fullmatch(name):
            continue  # recomputed from model.rope_dims / rope_base; holds no learned value
        elif name in RENAMES:
            pieces = {RENAMES[name]: tensor}
        elif block and block.group(2) in BLOCK_RENAMES:
            pieces = {f"blocks.{block.group(1)}.{BLOCK_RENAMES[block.group(2)]}": tensor}
        elif _pgolf_shaped(name):
            pieces = {name: tensor}
        else:
            unknown.append(name)
            continue
        twice = sorted(set(pieces) & set(mapped))
        if twice:
            raise ValueError(f"{twice} come both from {name} and from "
                             f"{sorted({origin[k] for k in twice})}")
        mapped.update(pieces)
        origin.update(dict.fromkeys(pieces, name))
    return mapped, origin, unknown


def _pgolf_shaped(name: str) -> bool:
    top = {"tok_emb.weight", "lm_head.weight", "skip_weights", "skip_gates", "smear_lambda"}
    block = BLOCK.fullmatch(name)
    per_block = {"attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight",
                 "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight",
                 "mlp.proj.weight"}
    return name in top or bool(block and block.group(2) in per_block)


def check_names(mapped: dict[str, torch.Tensor], origin: dict[str, str], unknown: list[str],
                expected: dict[str, torch.Size]) -> None:
    """Every problem at once: unknown upstream names, pgolf tensors the file lacks, tensors the
    configured model has no place for, and shape mismatches (tensor, file shape, model shape)."""
    problems = []
    if unknown:
        problems.append(f"unknown tensor names (no pgolf counterpart): {sorted(unknown)}")
    missing = sorted(set(expected) - set(mapped))
    if missing:
        problems.append(f"missing tensors the configured model needs: {missing}")
    extra = sorted(set(mapped) - set(expected))
    if extra:
        problems.append(f"tensors the configured model has no place for (check the model "
                        f"section: skip_gates, tie_embeddings, smear_gate, attn_gate): {extra}")
    for name in sorted(set(mapped) & set(expected)):
        if tuple(mapped[name].shape) != tuple(expected[name]):
            source = "" if origin[name] == name else f" (from {origin[name]})"
            problems.append(f"{name}{source}: shape {tuple(mapped[name].shape)} in the "
                            f"checkpoint, {tuple(expected[name])} in the configured model")
    if problems:
        raise ValueError("\n".join(problems))


def import_checkpoint(checkpoint: str | Path, cfg: GPTConfig, out: str | Path) -> GPT:
    """Load an upstream state dict into a pgolf GPT built from `cfg` and save it as the trainer
    does. The header says looping whenever the config loops: the records switch looping on during
    training and evaluate their final model with it."""
    state = read_state_dict(checkpoint)
    model = GPT(cfg)
    try:
        mapped, origin, unknown = to_pgolf(state, cfg)
    except ValueError as err:
        raise ValueError(f"checkpoint {checkpoint}: {err}") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    try:
        check_names(mapped, origin, unknown, expected)
    except ValueError as err:
        raise ValueError(f"checkpoint {checkpoint} does not fit the configured model:\n{err}") \
            from None
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
    model.looping = cfg.num_loops > 0
    save_model(Path(out), model, seed=None, step=None, looping=model.looping,
               imported_from={"path": str(checkpoint), "sha256": sha256_file(checkpoint)})
    return model
