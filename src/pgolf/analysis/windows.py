"""The validation windows the model-running analyses read, and the float model they run."""

from dataclasses import dataclass
from pathlib import Path

from pgolf.model.checkpoint import load_model
from pgolf.quant.sweep import load_subset


@dataclass(kw_only=True)
class WindowsConfig:
    """The validation windows the model-running analyses (loops, skips) read."""

    windows: int = 32
    batch_seqs: int = 16


def model_subset(model_path: Path, shards: Path, tokenizer: Path, *, cfg: WindowsConfig,
                 seq_len: int):
    """The float model (eval mode) and the analysis windows."""
    model = load_model(model_path).eval()
    subset = load_subset(shards, tokenizer, model.cfg.vocab_size, windows=cfg.windows,
                         seq_len=seq_len, batch_seqs=cfg.batch_seqs)
    return model, subset

