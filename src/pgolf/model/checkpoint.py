"""Model files: safetensors weights with the model config in the header (never pickle)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pgolf.config import section
from pgolf.io import atomic_path
from pgolf.model.gpt import GPT, GPTConfig

FORMAT = "pgolf-model-v1"


def save_model(path: Path, model: GPT, **meta) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)),
              **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_header(path: Path) -> dict:
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


def load_model(path: Path, device: torch.device | str = "cpu") -> GPT:
    """Rebuild the GPT from the config in the file's header and load its weights (strict)."""
    header = read_header(path)
    model = GPT(section(GPTConfig, json.loads(header["config"]), "model"))
    model.load_state_dict(load_file(str(path)))
    model.looping = json.loads(header.get("looping", "false"))
    return model.to(device)
