"""The SLURM profile against a real one-node SLURM (tests/slurm/up.sh, 2 fake GPUs): every job goes
through sbatch, training asks for the GPUs of the config, the Hessian, sweep and eval jobs for one
each, the data rules for none."""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_workflow, write_jsonl
from test_workflow import tiny_config

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent / "slurm"


def missing() -> str | None:
    """Why a real cluster cannot be brought up here, or None."""
    if os.geteuid() != 0:
        return "needs root to install and start munge, slurmctld and slurmd"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "needs apt-get (Debian's slurm-wlm packages) or an installed slurmctld"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "needs snakemake-executor-plugin-slurm (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = missing()
    if reason:
        pytest.skip(f"real-SLURM test skipped: {reason}")
    subprocess.run(["bash", HERE / "up.sh"], check=True, env={**os.environ, "FAKE_GPUS": "2"})
    yield
    subprocess.run(["bash", HERE / "down.sh"], check=False)


def jobs() -> list[dict]:
    """Every job slurmctld still holds (MinJobAge keeps finished ones): id, comment, state, GPUs."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" not in fields:  # "No jobs in the system"
            continue
        gpus = re.search(r"gpu:(\d+)", fields.get("TresPerJob", ""))
        found.append({"id": int(fields["JobId"]), "comment": fields.get("Comment", ""),
                      "state": fields["JobState"], "gpus": int(gpus.group(1)) if gpus else 0})
    return found


def test_the_profile_submits_every_job_with_the_configs_gpus(cluster, tmp_path, sotu_texts):
    before = {job["id"] for job in jobs()}
    workflow = make_workflow(tmp_path)
    write_jsonl(workflow.root / "docs.jsonl", sotu_texts[:30])
    # device auto: the jobs ask SLURM for GPUs, then run on its CPUs (the fake GPUs are no CUDA)
    config = tiny_config("docs.jsonl", hessian={"device": "auto"}, eval={"device": "auto"},
                         train={"device": "auto", "nproc": 2, "loader": {"streams": 2}})
    workflow.write_config(config)
    targets = [f"results/tiny/seed1/{name}" for name in (
        "sweep/tok_emb.weight.parquet", "eval/uniform/prequant.json")]
    # no accounting daemon here: squeue answers the status queries; poll after 1 s, not 40;
    # the node has 2 CPUs, so no job may ask for more (the tokenizer asks for 8 threads, the
    # profile's training 8 CPUs per GPU)
    workflow.run(*targets, "--profile", "profiles/slurm", "--slurm-status-command", "squeue",
                 "--slurm-init-seconds-before-status-checks", "1", "--max-threads", "2",
                 "--set-resources", "train:cpus_per_gpu=1", cores=None)
    assert all(workflow.path(target).exists() for target in targets)
    mine = [job for job in jobs() if job["id"] not in before]
    rules = {re.sub(r"^rule_([a-z_]+?)(_wildcards.*)?$", r"\1", job["comment"]): job
             for job in mine}
    assert set(rules) == {"corpus", "tokenizer", "shards", "window_scores", "curriculum",
                          "train", "hessians", "sweep_baseline", "sweep", "eval_prequant"}
    assert all(job["state"] == "COMPLETED" for job in mine)
    assert rules["train"]["gpus"] == config["train"]["nproc"] == 2  # torchrun's processes
    assert all(rules[name]["gpus"] == 1
               for name in ("hessians", "sweep_baseline", "sweep", "eval_prequant"))
    assert all(rules[name]["gpus"] == 0 for name in ("corpus", "tokenizer", "shards"))
    log = workflow.path("results/tiny/logs/train_seed1.log").read_text()
    assert "world 2" in log  # two ranks under one SLURM job
