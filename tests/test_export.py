"""The exported train_gpt.py, run by itself from a records-like folder: upstream's env variables,
no pgolf installed, no pipeline-only package; it rebuilds the pipeline's artifact and score."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.bundle import decode_allocation, encode_allocations, minify
from pgolf.data.shards import list_shards, write_shard
from pgolf.io import read_json
from pgolf.standalone import data_paths

# What the script must not import: pipeline-only packages, and pgolf from anywhere but itself
# (the script's own finder sits before this one on sys.meta_path).
BLOCKER = """import importlib.abc, importlib.machinery, sys
BLOCKED = {"pyarrow", "safetensors", "yaml", "jsonschema", "snakemake", "tqdm", "matplotlib",
           "pgolf"}
class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a spec whose import fails: probes such as torch's importlib.util.find_spec still succeed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"blocked import of {spec.name}")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Blocker())
"""


def test_allocations_round_trip_at_a_fixed_width():
    names = ["tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight"]
    seeds = [{"bits": {names[0]: 8, names[1]: 5}, "clip_sigmas": {names[0]: 12.85},
              "lqer": {names[1]: 4}},
             {"bits": {n: 6 for n in names}, "clip_sigmas": {n: 0.1 * i for i, n in
                                                             enumerate(names)}}]
    text = encode_allocations(seeds, names)
    assert len(text) == len(encode_allocations([{"bits": {}}] * 2, names))
    assert decode_allocation(text, names, 0) == ({names[0]: 8, names[1]: 5}, {names[0]: 12.85},
                                                 {names[1]: 4})
    assert decode_allocation(text, names, 1) == ({n: 6 for n in names},
                                                 {n: 0.1 * i for i, n in enumerate(names)}, {})


def test_minify_drops_comments_and_function_docstrings_only():
    source = ('"""Module doc."""\n\n\ndef f(x):  # a comment\n    """Doc."""\n'
              '    return x + 1  # another\n\n\nclass C:\n    """Doc."""\n')
    small = minify(source)
    assert "comment" not in small and "another" not in small and small.count('"""') == 2
    assert "Module doc." in small
    namespace = {}
    exec(small, namespace)
    assert namespace["f"](2) == 3 and namespace["__doc__"] == "Module doc."
    assert namespace["f"].__doc__ is None and namespace["C"].__doc__ is None


def test_data_paths_follow_upstreams_variables_and_layout(tmp_path):
    assert data_paths(8192, env={}) == (Path("data/datasets/fineweb10B_sp8192"),
                                        Path("data/tokenizers/fineweb_8192_bpe.model"))
    assert data_paths(384, env={"DATA_DIR": "/d"}) == (
        Path("/d/datasets/fineweb10B_sp384"), Path("/d/tokenizers/fineweb_384_bpe.model"))
    assert data_paths(384, env={"DATA_DIR": "/d", "DATA_PATH": "/s", "TOKENIZER_PATH": "/t"}) \
        == (Path("/s"), Path("/t"))
    # upstream's shard names are read where pgolf's are absent; pgolf's win where both are
    for name in ("fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, np.arange(10))
    assert [p.name for p in list_shards(tmp_path, "train")] == ["fineweb_train_000000.bin",
                                                                "fineweb_train_000001.bin"]
    write_shard(tmp_path / "train_000000.bin", np.arange(10))
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000000.bin"]


@pytest.mark.slow
def test_exported_script_reproduces_the_pipeline(finished_once, tmp_path):
    run = finished_once.path("results/tiny")
    submission = run / "submission"
    script = submission / "train_gpt.py"
    submitted = read_json(submission / "submission.json")
    rd = read_json(run / "seed1/artifact/rd.json")
    assert submitted["bytes_code"] == script.stat().st_size == rd["code"]["bytes"]
    folder = tmp_path / "records" / "track_10min_16mb" / "tiny"
    folder.mkdir(parents=True)
    shutil.copy(script, folder / "train_gpt.py")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(guard), "SEED": "1",
           "DATA_PATH": str(run / "data/shards"),
           "TOKENIZER_PATH": str(run / "data/tokenizer.model")}
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # Same seed, data and code on the CPU: training, Hessians and GPTQ are deterministic, so the
    # artifact is the pipeline's byte for byte, and so is its score
    assert (folder / "final_model.pgz").read_bytes() == (run / "seed1/artifact/rd.pgz").read_bytes()
    ttt = read_json(run / "seed1/eval/rd/ttt.json")
    exact = re.search(r"final_quantized_ttt_exact val_loss:(\S+) val_bpb:(\S+)", out)
    assert (float(exact[1]), float(exact[2])) == (ttt["loss"], ttt["bpb"])
    assert f"quantized_ttt val_loss:{ttt['loss']:.8f} val_bpb:{ttt['bpb']:.8f}" in out
    total = int(re.search(r"Total submission size quantized\+pgz: (\d+) bytes", out)[1])
    assert total == submitted["bytes_total"] <= 16_000_000
    assert f"Code size: {script.stat().st_size} bytes" in out
