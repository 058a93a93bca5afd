"""What the structure analyses read from a checkpoint: its matrices and a fresh initialisation."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from pgolf.model.checkpoint import read_config
from pgolf.model.config import quantizable_matrices
from pgolf.model.gpt import GPT


def matrices(model_path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint's tensors and the names of its quantizable matrices."""
    cfg, _ = read_config(model_path)
    return load_file(str(model_path)), [name for name, _ in quantizable_matrices(cfg)]


def initial_state(model_path: Path, seed: int) -> dict[str, torch.Tensor]:
    """The weights of a freshly initialised model of the checkpoint's config."""
    cfg, _ = read_config(model_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg).state_dict()
