"""Resume state: nested dicts of tensors and plain values as safetensors + JSON (never pickle).

A state is written as state-<step>.safetensors and state-<step>.json, each atomically, and then
latest.json points at it, so a kill at any moment leaves the previous state loadable.
"""

import json
from pathlib import Path

import torch

from pgolf.io import atomic_path, read_json, write_json

# safetensors is imported where used: the exported train_gpt.py ships this module without it.


def flatten(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested structure by {"__tensor__": key}; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [flatten(v, tensors, prefix) for v in obj]
    return obj


def unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        # Keys keep their type (optimizer state is keyed by int).
        return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state(directory: Path, step: int, state: dict, *, keep: int = 1) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    skeleton = flatten(state, tensors)
    stem = f"state-{step:08d}"
    with atomic_path(directory / f"{stem}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(directory / f"{stem}.json", skeleton)
    write_json(directory / "latest.json", {"step": step, "stem": stem})
    for old in sorted(directory.glob("state-*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def load_state(directory: Path) -> dict | None:
    """The latest complete state in `directory`, or None."""
    from safetensors.torch import load_file

    pointer = directory / "latest.json"
    if not pointer.exists():
        return None
    stem = read_json(pointer)["stem"]
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    with open(directory / f"{stem}.json") as f:
        return unflatten(json.load(f), tensors)
