"""Shared fixtures: real text from the bundled corpus, a tiny real tokenizer, workflow runs."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pgolf.data.corpus import read_jsonl
from pgolf.data.tokenizer import TokenizerConfig, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "sotu.jsonl.xz"
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
                  "profiles", "src", "data"]


@pytest.fixture(scope="session")
def sotu_texts() -> list[str]:
    """The first 40 addresses of the bundled corpus (about 1.8 MB of real English)."""
    texts = []
    for text in read_jsonl(DEMO):
        texts.append(text)
        if len(texts) == 40:
            return texts


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, sotu_texts) -> Path:
    """A real SentencePiece model with upstream's options, vocab 384, trained once per session."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(sotu_texts[5:], path, cfg=TokenizerConfig(vocab_size=384), threads=2)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread: the tensors of the analysis tests are tiny, and on a busy machine
    intra-op threads only contend (5x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


class Workflow:
    """A private copy of the workflow in a temporary folder, driven by the real snakemake CLI."""

    def __init__(self, root: Path):
        self.root = root

    def write_config(self, config: dict, name: str = "test.yaml") -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(config))
        return path

    def run(self, *args: str, config: str | list = "test.yaml", check: bool = True,
            cores: str | None = "2", env: dict | None = None):
        configs = [config] if isinstance(config, str) else list(map(str, config))
        # --configfile takes several values, so targets and flags must come before it.
        cmd = [sys.executable, "-m", "snakemake", *(["--cores", cores] if cores else []), *args,
               "--configfile", *configs]
        # shell rules launch `python` and `torchrun`: the ones beside this interpreter
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        result = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True,
                                env={**os.environ, "PATH": path, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def planned(self, *args: str, config: str = "test.yaml") -> dict[str, int]:
        """Rules a dry run would execute, with their job counts ({} when up to date)."""
        out = self.run("-n", *args, config=config).stdout
        if "Nothing to be done" in out:
            return {}
        table = out.split("Job stats:")[1].split("total")[0].splitlines()[3:]
        return {rule: int(n) for rule, n in (line.split() for line in table if line.strip())}

    def path(self, rel: str) -> Path:
        return self.root / rel


def make_workflow(root: Path) -> Workflow:
    ignore = shutil.ignore_patterns("__pycache__", "hf_cache")
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        else:
            shutil.copy2(src, root / name)
    return Workflow(root)


@pytest.fixture
def workflow(tmp_path) -> Workflow:
    return make_workflow(tmp_path)


TINY_MODEL = {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1,
              "loop_start": 0, "loop_end": 0, "num_loops": 1, "rope_train_seq_len": 64}
TINY_TRAIN = {"seq_len": 64, "batch_tokens": 256, "steps": 4, "max_seconds": None,
              "checkpoint_every": 0, "val_max_tokens": 4096}


def tiny_config(docs, **overrides):
    config = {
        "run": "tiny",
        "corpus": {"source": "jsonl", "path": str(docs)},
        "tokenizer": {"vocab_size": 384},
        "shards": {"val_docs": 3, "shard_tokens": 30_000},
        "manifest": {"num_buckets": 4},
        "model": TINY_MODEL,
        "train": TINY_TRAIN,
        "hessian": {"batches": 2, "batch_seqs": 4, "device": "auto"},
        "sweep": {"bits": [4, 6, 8], "windows": 8, "batch_seqs": 8, "bootstrap": 100},
        "allocate": {"policies": ["uniform", "rd"], "rd": {"budget": "policy:uniform"}},
        "eval": {"max_tokens": 2048, "stride": 16, "batch_seqs": 16},
        "ttt": {"chunk_tokens": 512, "epochs": 1, "lr": 0.01, "batch_seqs": 4},
        "analysis": {"windows": 4, "batch_seqs": 4, "loops": {"iterations": 3, "bootstrap": 100},
                     "outliers": {"draws": 2},
                     "generation": {"prompts": 2, "prompt_tokens": 8, "new_tokens": 8}},
        "seeds": [1],
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture(scope="session")
def finished_once(tmp_path_factory, sotu_texts):
    """The tiny run, completed once per session (test_workflow and test_export read it)."""
    workflow = make_workflow(tmp_path_factory.mktemp("finished"))
    write_jsonl(workflow.root / "docs.jsonl", sotu_texts[:30])
    workflow.write_config(tiny_config("docs.jsonl"))  # relative: copies keep the same params
    # two fake GPUs: the jobs that hold GPUs claim them (and, with no CUDA, run on the CPU)
    workflow.run(env={"PGOLF_GPU_DEVICES": "2", "PGOLF_GPU_LOCKS": str(workflow.root / "locks")})
    return workflow


def check_refuses_damage(blob: bytes, unpack) -> None:
    """An optional codec's blob: truncation, a wrong magic and trailing bytes raise ValueError;
    a flipped byte gives a clear ValueError or a valid representation, never another error."""
    for cut in (0, 3, 10, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError):
            unpack(blob[:cut])
    with pytest.raises(ValueError, match="magic"):
        unpack(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="unexpected bytes"):
        unpack(blob + b"\0")
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(blob), 40).tolist():
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        with contextlib.suppress(ValueError):
            unpack(bytes(bad))
