"""The analysis stages' file-level entry points: read the checkpoints, artifacts and validation
windows, run one analysis, write its table (with definition and null) and its figure."""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pgolf.analysis import damage, generation, loops, outliers, procrustes, skips
from pgolf.analysis.table import write_analysis
from pgolf.eval.bpb import val_stream
from pgolf.eval.bpb import windows as val_windows
from pgolf.eval.run import artifact_model
from pgolf.model.checkpoint import load_model, read_config
from pgolf.model.config import quantizable_matrices
from pgolf.model.gpt import GPT
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


def build_outliers(model_path: Path, table: Path, plot: Path, *, draws: int,
                   provenance=None) -> list[dict]:
    state, names = matrices(model_path)
    rows = outliers.outlier_table(state, names, draws=draws)
    write_analysis(rows, table, definition=outliers.DEFINITION, null=outliers.NULL,
                   provenance=provenance, draws=draws)
    outliers.plot_outliers(rows, plot)
    return rows


def build_procrustes_layers(model_path: Path, table: Path, plot: Path, *,
                            cfg: procrustes.ProcrustesConfig, provenance=None) -> list[dict]:
    state, names = matrices(model_path)
    rows = procrustes.layer_table(state, names, cfg=cfg, init=initial_state(model_path, 0))
    write_analysis(rows, table, definition=procrustes.DEFINITION, null=procrustes.NULL,
                   provenance=provenance)
    procrustes.plot_procrustes(rows, plot, label="layer pairs of one model")
    return rows


def build_procrustes_seeds(model_paths: dict[int, Path], table: Path, plot: Path, *,
                           cfg: procrustes.ProcrustesConfig, provenance=None) -> list[dict]:
    loaded = {seed: matrices(path) for seed, path in model_paths.items()}
    names = next(iter(loaded.values()))[1]
    if any(found != names for _, found in loaded.values()):
        raise ValueError(f"cross-seed Procrustes needs one architecture: {list(model_paths)} "
                         "differ in their quantizable matrices")
    inits = {seed: initial_state(path, seed) for seed, path in model_paths.items()}
    rows = procrustes.seed_table({s: state for s, (state, _) in loaded.items()}, names, cfg=cfg,
                                 inits=inits)
    write_analysis(rows, table, definition=procrustes.DEFINITION, null=procrustes.NULL,
                   provenance=provenance)
    procrustes.plot_procrustes(rows, plot, label="one matrix across seeds")
    return rows


def build_skips(model_path: Path, shards: Path, tokenizer: Path, table: Path, plot: Path, *,
                cfg: WindowsConfig, seq_len: int, provenance=None) -> list[dict]:
    model, subset = model_subset(model_path, shards, tokenizer, cfg=cfg, seq_len=seq_len)
    rows = skips.skip_rows(model, subset)
    write_analysis(rows, table, definition=skips.DEFINITION, null=skips.NULL,
                   provenance=provenance, bytes_scored=subset.num_bytes)
    skips.plot_skips(rows, plot)
    return rows


def build_damage(runs: dict[str, dict[str, Path]], sensitivity: Path, table: Path, plot: Path,
                 *, provenance=None) -> list[dict]:
    """runs: per policy its allocation, prequant and roundtrip files."""
    rows = [damage.damage_row(policy, files["allocation"], files["prequant"],
                              files["roundtrip"], sensitivity)
            for policy, files in runs.items()]
    write_analysis(rows, table, definition=damage.DEFINITION, null=damage.NULL,
                   provenance=provenance)
    damage.plot_damage(rows, plot)
    return rows



def quantized_models(artifacts: dict[str, Path]) -> dict:
    """Each policy's model as its artifact stands for it (dequantized), in eval mode."""
    return {policy: artifact_model(path).eval() for policy, path in artifacts.items()}


def build_loops(model_path: Path, artifacts: dict[str, Path], shards: Path, tokenizer: Path,
                table: Path, plot: Path, *, windows: WindowsConfig, cfg: loops.LoopConfig,
                seq_len: int, provenance=None) -> list[dict]:
    """The float model's loop contraction beside each quantized artifact's."""
    model, subset = model_subset(model_path, shards, tokenizer, cfg=windows, seq_len=seq_len)
    batches = [x for x, _ in subset.batches]
    variants = {"float": model, **quantized_models(artifacts)}
    rows = [row for name, m in variants.items()
            for row in loops.loop_rows(m, batches, cfg=cfg, variant=name)]
    write_analysis(rows, table, definition=loops.DEFINITION, null=loops.NULL,
                   provenance=provenance)
    loops.plot_loops(rows, plot)
    return rows


def build_generation(model_path: Path, artifacts: dict[str, Path], shards: Path, table: Path,
                     plot: Path, *, cfg: generation.GenerationConfig, seq_len: int,
                     provenance=None) -> list[dict]:
    """Float against each artifact on the first validation windows as prompts."""
    model = load_model(model_path).eval()
    length = cfg.prompt_tokens + cfg.new_tokens
    tokens, _ = val_windows(val_stream(shards), length, cfg.prompts)
    if len(tokens) < cfg.prompts:
        raise ValueError(f"{shards}: validation holds {len(tokens)} windows of {length} tokens, "
                         f"analysis.generation.prompts = {cfg.prompts}")
    tokens = torch.from_numpy(tokens).long()
    prompts, continuations = tokens[:, :cfg.prompt_tokens], tokens[:, cfg.prompt_tokens:]
    rows = generation.compare(model, quantized_models(artifacts), prompts, continuations,
                              cfg=cfg, max_context=seq_len)
    rows = [{**row, "prompt": str(row["prompt"])} for row in rows]  # one parquet type
    write_analysis(rows, table, definition=generation.DEFINITION, null=generation.NULL,
                   provenance=provenance)
    generation.plot_generation([{**r, "prompt": int(r["prompt"])} for r in rows
                                if r["prompt"] != "all"], plot)
    return rows
