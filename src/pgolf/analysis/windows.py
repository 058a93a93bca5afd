"""The validation windows the model-running analyses read, and the float model they run."""

from dataclasses import dataclass
from pathlib import Path

from pgolf.quant.sweep import model_and_subset


@dataclass(kw_only=True)
class WindowsConfig:
    """The validation windows the model-running analyses (loops, skips) read."""

    windows: int = 32
    batch_seqs: int = 16


def model_subset(model_path: Path, shards: Path, tokenizer: Path, *, cfg: WindowsConfig,
                 seq_len: int):
    """The float model (eval mode) and the analysis windows, on the CPU."""
    return model_and_subset(model_path, shards, tokenizer, windows=cfg.windows,
                            batch_seqs=cfg.batch_seqs, seq_len=seq_len)

