"""The real workflow, run by the snakemake CLI on a tiny config: outputs, reruns, bad input."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL, TINY_TRAIN, Workflow, tiny_config, write_jsonl
from safetensors import safe_open

from pgolf.analysis.table import read_analysis
from pgolf.data.scores import read_metadata
from pgolf.data.shards import list_shards
from pgolf.io import read_json
from pgolf.model.gpt import GPTConfig, quantizable_matrices
from pgolf.quant.artifact import read_artifact

pytestmark = pytest.mark.slow
DATA = "results/tiny/data"
EVALS = {"eval", "seeds", "submission", "all"}
# what reads the artifacts besides the evaluation: figures and analyses
ARTIFACT_READERS = {"allocation_plots", "analysis_loops", "analysis_generation", "analysis_damage"}
QUANTIZERS = {"sweep_baseline", "sweep", "block_groups", "sensitivity", "allocate", "artifact",
              *ARTIFACT_READERS, *EVALS}
MODEL_READERS = {"loss_curves", "analysis_outliers", "analysis_procrustes", "analysis_skips"}
AFTER_TRAIN = {"train", "hessians", "eval_prequant", *MODEL_READERS, *QUANTIZERS}
DATA_RULES = {"tokenizer", "shards", "window_scores", "curriculum", *AFTER_TRAIN}
@pytest.fixture
def finished(finished_once, tmp_path):
    """A private copy of the finished run (results and Snakemake metadata, mtimes kept)."""
    root = tmp_path / "wf"
    shutil.copytree(finished_once.root, root, symlinks=True)
    workflow = Workflow(root)
    workflow.docs = "docs.jsonl"
    return workflow


def edited(workflow, rel, planned_args=()):
    """Rules a dry run plans after appending a comment to one source file (then restored)."""
    path = workflow.path(rel)
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        return set(workflow.planned(*planned_args))
    finally:
        path.write_text(original)


def test_full_run_writes_every_data_artifact(finished):
    data = finished.path(DATA)
    shards = read_json(data / "shards.json")
    assert shards["splits"]["val"]["docs"] == 3 and shards["splits"]["train"]["docs"] == 27
    assert len(list_shards(data / "shards", "train")) > 1
    manifest = read_json(data / "curriculum.json")
    assert manifest["num_buckets"] == 4 and manifest["seq_len"] == 64
    assert manifest["windows"] == sum(b["count"] for b in manifest["buckets"])
    assert read_json(data / "docs.json")["provenance"]["code_hash"]
    assert (finished.path("results/tiny/benchmarks/shards.tsv")).exists()
    train = read_json(finished.path("results/tiny/seed1/train.json"))
    assert train["steps"] == 4 and train["val"]["model"]["bpb"] > 0
    with safe_open(str(finished.path("results/tiny/seed1/hessians.safetensors")), "pt") as f:
        names = set(f.keys())
    assert names == {n for n, _ in quantizable_matrices(GPTConfig(vocab_size=384, **TINY_MODEL))}
    packed = read_json(finished.path("results/tiny/seed1/artifact/uniform.json"))
    pgz = finished.path("results/tiny/seed1/artifact/uniform.pgz")
    assert packed["artifact_bytes"] == pgz.stat().st_size
    assert packed["total_bytes"] == packed["artifact_bytes"] + packed["code"]["bytes"]
    tensors, meta = read_artifact(pgz)
    assert tensors["tok_emb.weight"].bits == 8 and tensors["blocks.0.mlp.fc.weight"].bits == 6
    assert meta["model"]["num_layers"] == TINY_MODEL["num_layers"]
    table = pq.read_table(finished.path("results/tiny/seed1/sensitivity.parquet")).to_pylist()
    assert {(r["matrix"], r["bits"]) for r in table} == {(n, b) for n in names
                                                         for b in (4, 6, 8)}
    assert all(r["noise_se"] >= 0 and r["bytes"] > 0 for r in table)
    uniform = read_json(finished.path("results/tiny/seed1/alloc/uniform.json"))
    rd = read_json(finished.path("results/tiny/seed1/alloc/rd.json"))
    rd_packed = read_json(finished.path("results/tiny/seed1/artifact/rd.json"))
    assert rd["budget"]["bytes"] == packed["artifact_bytes"]
    assert rd["predicted"]["dbpb"] <= uniform["predicted"]["dbpb"]
    assert rd_packed["predicted_bytes"] == rd["predicted"]["bytes"]
    assert rd_packed["artifact_bytes"] <= packed["artifact_bytes"]  # at uniform's bytes or fewer
    seeds = read_json(finished.path("results/tiny/seeds.json"))
    assert [(r["seed"], r["policy"]) for r in seeds["rows"]] == [(1, "uniform"), (1, "rd")]
    for row in seeds["rows"]:
        for mode in ("prequant", "roundtrip", "sliding", "ttt"):
            result = read_json(finished.path(f"results/tiny/seed1/eval/{row['policy']}/"
                                             f"{mode}.json"))
            assert row[mode] == result["bpb"] and result["tokens"] == 2048
        assert row["artifact_bytes"] == read_json(finished.path(
            f"results/tiny/seed1/artifact/{row['policy']}.json"))["artifact_bytes"]
    roundtrip = read_json(finished.path("results/tiny/seed1/eval/rd/roundtrip.json"))
    assert roundtrip["guard"]["passed"] and roundtrip["source"].endswith("artifact/rd.pgz")
    assert "| 1 | rd |" in finished.path("results/tiny/seeds.md").read_text()
    submitted = read_json(finished.path("results/tiny/submission/submission.json"))
    upstream = {"author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb",
                "bytes_total", "bytes_code"}
    assert upstream <= set(submitted) and submitted["policy"] == "rd"  # the last policy
    ttt = read_json(finished.path("results/tiny/seed1/eval/rd/ttt.json"))
    assert (submitted["val_bpb"], submitted["val_loss"]) == (ttt["bpb"], ttt["loss"])
    assert submitted["bytes_total"] == rd_packed["total_bytes"]
    assert submitted["bytes_code"] == rd_packed["code"]["bytes"]
    folder = finished.path("results/tiny/submission")
    assert (folder / "artifact_seed1.pgz").read_bytes() == finished.path(
        "results/tiny/seed1/artifact/rd.pgz").read_bytes()
    assert {p.name for p in (folder / "logs").iterdir()} >= {
        "train_seed1.log", "train_seed1.json", "eval_seed1_rd_ttt.log"}
    assert f"val_bpb {ttt['bpb']:.5f}" in (folder / "README.md").read_text()
    assert (folder / "train_gpt.py").stat().st_size == submitted["bytes_code"]
    assert finished.planned() == {}


def test_gpu_jobs_claim_a_device_and_cpu_jobs_none(finished):
    logs = {p.stem: p.read_text() for p in finished.path("results/tiny/logs").glob("*.log")}
    holders = {name for name, text in logs.items() if "pgolf.gpuslots: this job holds GPU" in text}
    # device auto: Hessians and the sweep stages hold a GPU; train.device and eval.device are cpu
    expected = {"hessians_seed1", "sweep_baseline_seed1", "block_groups_seed1",
                *(name for name in logs if name.startswith("sweep_seed1_"))}
    assert holders == expected and len(expected) > 6
    for name in holders:
        assert re.search(r"holds GPU [01]\n", logs[name]), name
    meta = read_metadata(finished.path("results/tiny/seed1/sweep_baseline.parquet"))
    assert meta["device"] == "cpu"  # the fake devices are not CUDA: auto fell back


ANALYSES = {"outliers": "analysis_outliers", "procrustes_layers": "analysis_procrustes",
            "skips": "analysis_skips", "loops": "analysis_loops",
            "generation": "analysis_generation", "damage": "analysis_damage"}
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_analysis_carries_its_definition_and_null(finished):
    folder = finished.path("results/tiny/seed1/analysis")
    for name, stage in ANALYSES.items():
        rows, meta = read_analysis(folder / f"{name}.parquet")
        assert rows and len(meta["definition"]) > 100 and len(meta["null"]) > 100
        assert meta["provenance"]["stage"] == stage and meta["provenance"]["inputs"]
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    # spot checks against the stages' own outputs
    damage = {r["policy"]: r for r in read_analysis(folder / "damage.parquet")[0]}
    for policy, row in damage.items():
        evals = [read_json(finished.path(f"results/tiny/seed1/eval/{policy}/{mode}.json"))
                 for mode in ("prequant", "roundtrip")]
        assert row["measured_dbpb"] == pytest.approx(evals[1]["bpb"] - evals[0]["bpb"],
                                                     abs=1e-12)
        assert row["predicted_dbpb"] == read_json(finished.path(
            f"results/tiny/seed1/alloc/{policy}.json"))["predicted"]["dbpb"]
    loops = read_analysis(folder / "loops.parquet")[0]
    assert {r["variant"] for r in loops} == {"float", "uniform", "rd"}
    assert len(read_analysis(folder / "skips.parquet")[0]) == 1  # [0, 0 | 1]: one skip
    for plot in ("loss_curves.png", "seed1/allocation.png", "seed1/bytes.png"):
        assert finished.path(f"results/tiny/{plot}").read_bytes()[:8] == PNG


def test_the_report_holds_the_figures_with_captions(finished):
    finished.run("--report", "report.html", cores=None)  # as the README says: no --cores
    html = finished.path("report.html").read_text()
    for name in [*ANALYSES, "curriculum", "sensitivity", "loss_curves", "allocation", "bytes",
                 "seeds.html"]:
        assert name in html, name
    assert "shared random stream" in html or "same Gumbel" in html  # a caption, rendered


def test_config_edits_rerun_exactly_their_stages(finished):
    config = tiny_config(finished.docs, manifest={"num_buckets": 5})
    finished.write_config(config)
    assert set(finished.planned()) == {"curriculum", *AFTER_TRAIN}
    finished.run()
    assert read_json(finished.path(f"{DATA}/curriculum.json"))["num_buckets"] == 5
    assert finished.planned() == {}
    finished.write_config({**config, "tokenizer": {"vocab_size": 416}})
    assert set(finished.planned()) == DATA_RULES
    finished.write_config({**config, "scores": {"scorer": "zstd"}})
    assert set(finished.planned()) == {"window_scores", "curriculum", *AFTER_TRAIN}
    finished.write_config({**config, "train": {**TINY_TRAIN, "steps": 5}})
    assert set(finished.planned()) == AFTER_TRAIN
    finished.write_config({**config, "hessian": {"batches": 3, "batch_seqs": 4}})
    requantize = QUANTIZERS - {"sweep_baseline"}
    assert set(finished.planned()) == {"hessians", *requantize}  # never retrains
    finished.write_config({**config, "gptq": {"damp": 0.02}})
    assert set(finished.planned()) == requantize  # re-quantizes only
    finished.write_config({**config, "sweep": {**config["sweep"], "bits": [4, 6, 7, 8]}})
    assert set(finished.planned()) == {"sweep", "sensitivity", "allocate", "artifact",
                                       *ARTIFACT_READERS, *EVALS}


def test_eval_edits_rerun_only_their_modes(finished):
    config = tiny_config(finished.docs)
    finished.write_config({**config, "ttt": {**config["ttt"], "lr": 0.02}})
    # ttt, per policy
    assert finished.planned() == {"eval": 2, "seeds": 1, "submission": 1, "all": 1}
    finished.write_config({**config, "eval": {**config["eval"], "stride": 32}})
    # sliding and ttt
    assert finished.planned() == {"eval": 4, "seeds": 1, "submission": 1, "all": 1}
    finished.write_config({**config, "eval": {**config["eval"], "max_tokens": 1024}})
    assert finished.planned() == {"eval_prequant": 1, "eval": 6, "analysis_damage": 1, "seeds": 1,
                                  "submission": 1, "all": 1}
    finished.write_config({**config, "eval": {**config["eval"],
                                              "modes": ["prequant", "roundtrip", "ttt"]}})
    assert finished.planned() == {"seeds": 1, "submission": 1, "all": 1}
    # the submission's mode becomes roundtrip: the exported train_gpt.py, so the code bytes the
    # size gate counts, change with it
    finished.write_config({**config, "eval": {**config["eval"],
                                              "modes": ["prequant", "roundtrip"]}})
    assert {"artifact", "seeds", "submission"} <= set(finished.planned())
    finished.write_config({**config, "lora_ttt": {"rank": 4, "phases": {"num_phases": 0}}})
    assert finished.planned() == {}  # phased_ttt is off unless listed
    finished.write_config({**config, "lora_ttt": {"rank": 4, "phases": {"num_phases": 0}},
                           "eval": {**config["eval"], "modes": [
                               "prequant", "roundtrip", "sliding", "ttt", "phased_ttt"]}})
    # listed, it becomes the submission's mode: the exported train_gpt.py changes, so does the
    # code-bytes count, and the artifacts are packed again under it
    planned = finished.planned()
    assert planned["eval"] >= 2 and {"artifact", "seeds", "submission"} <= set(planned)


def test_analysis_edits_rerun_only_that_analysis(finished):
    config = tiny_config(finished.docs)
    analysis = config["analysis"]
    finished.write_config({**config, "analysis": {**analysis, "generation": {
        **analysis["generation"], "temperature": 1.0}}})
    assert finished.planned() == {"analysis_generation": 1, "all": 1}
    finished.write_config({**config, "analysis": {**analysis, "windows": 3}})
    assert finished.planned() == {"analysis_loops": 1, "analysis_skips": 1, "all": 1}


def test_budget_edits_rerun_only_allocation_and_packing(finished):
    config = tiny_config(finished.docs)
    finished.write_config({**config, "allocate": {**config["allocate"],
                                                  "rd": {"budget": 50_000}}})
    # rd's allocation and artifact, not uniform's, rd's three artifact evaluations, and the
    # seed's figures and analyses that read every policy's artifact
    readers = dict.fromkeys(ARTIFACT_READERS, 1)
    assert finished.planned() == {"allocate": 1, "artifact": 1, "eval": 3, **readers, "seeds": 1,
                                  "submission": 1, "all": 1}
    finished.write_config({**config, "allocate": {**config["allocate"],
                                                  "uniform": {"matrix_bits": 8}}})
    # uniform's artifact sets rd's budget, so both policies follow
    assert finished.planned() == {"allocate": 2, "artifact": 2, "eval": 6, **readers, "seeds": 1,
                                  "submission": 1, "all": 1}


def test_touch_reruns_nothing_and_code_edits_rerun_their_stage(finished):
    for folder in ("src", "workflow_scripts", "rules", "schemas", "data"):
        for path in finished.path(folder).rglob("*"):
            os.utime(path)
    os.utime(finished.path("Snakefile"))
    assert finished.planned() == {}
    after_train = AFTER_TRAIN
    assert edited(finished, "src/pgolf/data/manifest.py") == {"curriculum", *after_train}
    assert edited(finished, "workflow_scripts/window_scores.py") == {"window_scores",
                                                                     "curriculum", *after_train}
    assert edited(finished, "src/pgolf/data/encode.py") == {"shards", "window_scores",
                                                            "curriculum", *after_train}
    assert edited(finished, "src/pgolf/train/muon.py") == after_train
    # the skip analysis scores through the sweep's helpers, so it follows quantizer edits
    assert edited(finished, "src/pgolf/quant/gptq.py") == {*QUANTIZERS, "analysis_skips"}
    # the evaluator reads artifacts, so its every mode follows a codec edit
    assert edited(finished, "src/pgolf/quant/codec.py") == {"eval_prequant", "analysis_skips",
                                                            *QUANTIZERS}
    assert edited(finished, "src/pgolf/eval/ttt.py") == {  # decoder: code bytes
        "allocate", "artifact", "eval_prequant", *ARTIFACT_READERS, *EVALS}
    assert edited(finished, "src/pgolf/quant/allocate.py") == {"allocate", "artifact",
                                                               *ARTIFACT_READERS, *EVALS}
    assert edited(finished, "src/pgolf/analysis/procrustes.py") == {"analysis_procrustes", "all"}
    assert edited(finished, "src/pgolf/eval/bpb.py") == AFTER_TRAIN  # train validates with it
    # tokenizer.py is imported by the tokenizer and shards stages, not by the corpus stage
    assert edited(finished, "src/pgolf/data/tokenizer.py") == DATA_RULES
    assert finished.planned() == {}


def test_size_gate_fails_with_the_breakdown_and_leaves_no_artifact(finished):
    finished.write_config(tiny_config(finished.docs, pack={"limit_bytes": 10_000}))
    result = finished.run(check=False)
    log = finished.path("results/tiny/logs/artifact_seed1_uniform.log").read_text()
    assert result.returncode != 0 and "exceeds pack.limit_bytes=10,000" in log
    assert "largest tensors: tok_emb.weight" in log
    assert not finished.path("results/tiny/seed1/artifact/uniform.pgz").exists()


def test_corrupt_shard_fails_and_leaves_no_output(finished):
    shard = list_shards(finished.path(f"{DATA}/shards"), "train")[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    result = finished.run("--forcerun", "window_scores", check=False)
    assert result.returncode != 0
    log = finished.path("results/tiny/logs/window_scores.log").read_text()
    assert str(shard.name) in log and "truncated or corrupt" in log
    assert not finished.path(f"{DATA}/window_scores.parquet").exists()
    # Snakemake leaves a missing intermediate alone while its consumers exist; asking for it
    # plans the job again.
    assert "window_scores" in finished.planned(f"{DATA}/window_scores.parquet")


def failing_run(workflow, config, log=None):
    workflow.write_config(config)
    result = workflow.run(check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    if log:
        text += workflow.path(f"results/tiny/logs/{log}.log").read_text()
    return text


def test_bad_config_values_name_the_file_and_value(workflow, tmp_path):
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", tokenizer={"vocab_size": 70000}))
    assert "test.yaml" in text and "tokenizer.vocab_size = 70000" in text
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", eval={"stride": 100}))
    assert "test.yaml" in text and "eval.stride = 100 must be at most the eval seq_len (64)" in text
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", manifest={"num_bucket": 3}))
    assert "'num_bucket' was unexpected" in text
    train = {**TINY_TRAIN, "nproc": 2, "loader": {"streams": 3}}
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", train=train))
    assert "train.nproc = 2 must divide train.loader.streams = 3" in text
    grid = {"variants": {"fast": {"ttt": {"lr": 0.1}}, "bad": {"seeds": [3]}}}
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", **grid))
    assert "variants.bad.seeds = [3]" in text
    grid["variants"].pop("bad")
    text = failing_run(workflow, tiny_config(tmp_path / "d.jsonl", **grid))
    assert "variants ['fast']: valid, but the DAG does not run ablation grids yet" in text
    assert not workflow.path("results").exists()


def test_missing_and_empty_corpus(workflow, tmp_path):
    text = failing_run(workflow, tiny_config(tmp_path / "missing.jsonl"))
    assert "missing.jsonl" in text and "Missing input files" in text
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    text = failing_run(workflow, tiny_config(empty), log="corpus")
    assert "pgolf: error:" in text and "empty.jsonl) has no documents" in text
    assert not workflow.path(f"{DATA}/docs.jsonl").exists()


def test_provided_tokenizer_must_match_the_config(workflow, sotu_texts, tokenizer_path):
    docs = write_jsonl(workflow.root / "docs.jsonl", sotu_texts[:8])
    config = tiny_config(docs, tokenizer={"model": str(tokenizer_path), "vocab_size": 416})
    text = failing_run(workflow, config, log="tokenizer")
    assert str(tokenizer_path) in text and "vocab size 384" in text and "vocab_size=416" in text
    assert not workflow.path(f"{DATA}/tokenizer.model").exists()


def test_upstream_shard_folder_source(finished, tokenizer_path, tmp_path):
    upstream = tmp_path / "fineweb10B_sp384"
    upstream.mkdir()
    ours = finished.path(f"{DATA}/shards")
    for split in ("val", "train"):
        for i, path in enumerate(list_shards(ours, split)):
            shutil.copy(path, upstream / f"fineweb_{split}_{i:06d}.bin")
    shutil.copy(finished.path(f"{DATA}/tokenizer.model"), tmp_path / "sp384.model")
    finished.path("results").rename(finished.path("before"))
    config = tiny_config(None, corpus={"source": "shards", "path": str(upstream)},
                         tokenizer={"model": str(tmp_path / "sp384.model")})
    finished.write_config(config)
    assert "corpus" not in finished.planned()
    finished.run(f"{DATA}/shards.json")  # the shards are what this source changes
    before = read_json(finished.path(f"before/{DATA.split('/', 1)[1]}/shards.json"))
    after = read_json(finished.path(f"{DATA}/shards.json"))
    for split in ("val", "train"):
        for key in ("docs", "tokens", "bpb_bytes"):
            assert before["splits"][split][key] == after["splits"][split][key]
    bad = upstream / "fineweb_train_000001.bin"
    with open(bad, "r+b") as f:
        f.write(np.int32(7).tobytes())  # wrong magic
    result = finished.run(f"{DATA}/shards.json", "--forcerun", "shards", check=False)
    log = finished.path("results/tiny/logs/shards.log").read_text()
    assert result.returncode != 0 and f"shard {bad}: wrong magic 7" in log
    assert not finished.path(f"{DATA}/shards.json").exists()


def test_audit_traces_an_artifact_to_the_corpus_and_catches_a_changed_shard(finished):
    def audit():
        return subprocess.run([sys.executable, "-m", "pgolf.cli", "audit",
                               "results/tiny/seed1/artifact/rd.pgz"], cwd=finished.root,
                              capture_output=True, text=True)
    done = audit()
    assert done.returncode == 0, done.stderr
    corpus = read_json(finished.path(f"{DATA}/docs.json"))
    assert f"corpus: {DATA}/docs.jsonl sha256 {corpus['sha256']}" in done.stdout
    for stage in ("artifact", "allocate", "sensitivity", "sweep", "hessians", "train",
                  "curriculum", "shards", "tokenizer", "corpus"):
        assert f": stage {stage}, code " in done.stdout
    assert "CHANGED" not in done.stdout
    assert " docs.jsonl: a source (no provenance record)" in done.stdout  # the user's corpus file
    shard = list_shards(finished.path(f"{DATA}/shards"), "train")[0]
    with open(shard, "r+b") as f:
        f.seek(2048)
        f.write(b"\x07\x00")
    done = audit()
    assert done.returncode == 1
    assert f"pgolf: error: {DATA}/shards/{shard.name}: sha256 " in done.stderr
    assert f"recorded by {DATA}/shards.json" not in done.stderr  # one line per file, not record
    assert f"CHANGED output {DATA}/shards/{shard.name}" in done.stdout
