"""Model files: safetensors weights with the model config in the header (never pickle)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from pgolf.config import section
from pgolf.io import atomic_path
from pgolf.model.gpt import GPT, GPTConfig

# safetensors is imported where used: the exported train_gpt.py ships this module without it.
FORMAT = "pgolf-model-v1"


def save_model(path: Path, model: GPT, **meta) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)),
              **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_header(path: Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"model {path}: not a safetensors file ({err})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"model {path}: format {header.get('format')!r}, expected {FORMAT!r}")
    return header


def read_config(path: Path) -> tuple[GPTConfig, bool]:
    """The model config in a checkpoint's header, and whether its layers loop."""
    header = read_header(path)
    return (section(GPTConfig, json.loads(header["config"]), "model"),
            json.loads(header.get("looping", "false")))


def load_model(path: Path, device: torch.device | str = "cpu") -> GPT:
    """Rebuild the GPT from the config in the file's header and load its weights (strict)."""
    from safetensors.torch import load_file

    cfg, looping = read_config(path)
    model = GPT(cfg)
    model.load_state_dict(load_file(str(path)))
    model.looping = looping
    return model.to(device)
