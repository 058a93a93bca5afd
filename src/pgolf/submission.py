"""The upstream `records/` folder for a chosen policy and seed set: train_gpt.py (pgolf.bundle),
README.md, submission.json, the train and eval logs and the artifacts, with the scores taken from
the eval stage's outputs."""

import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pgolf.bundle import render
from pgolf.eval.stats import spread
from pgolf.io import read_json, write_json
from pgolf.quant.codebytes import SRC


@dataclass(kw_only=True)
class SubmissionConfig:
    policy: str = "rd"  # the allocation policy whose artifacts are submitted
    mode: str = "ttt"  # the eval mode whose BPB is the score
    name: str = "pgolf run"
    author: str = ""
    github_id: str = ""
    blurb: str = ""


@dataclass(kw_only=True)
class SeedRun:
    """What one seed contributes: its outputs and its logs."""

    seed: int
    evals: dict  # mode -> eval JSON
    artifact: Path
    artifact_meta: dict
    train: Path  # train.json: the config, steps and timings
    logs: list  # log files to copy (missing ones are skipped)
    allocation: Path | None = None  # alloc/<policy>.json, frozen into train_gpt.py


def fields(runs: list[SeedRun], cfg: SubmissionConfig) -> dict:
    """submission.json: upstream's fields (the score is the mean over seeds; bytes are the
    largest seed's) and pgolf's per-seed detail."""
    scores = [r.evals[cfg.mode] for r in runs]
    bpb, loss = spread([s["bpb"] for s in scores]), spread([s["loss"] for s in scores])
    largest = max(runs, key=lambda r: r.artifact_meta["total_bytes"]).artifact_meta
    n = len(runs)
    return {"author": cfg.author, "github_id": cfg.github_id, "name": cfg.name,
            "blurb": cfg.blurb or f"pgolf: {cfg.policy} allocation, {cfg.mode} eval, "
                                  f"{n} seed(s)",
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "val_loss": loss["mean"], "val_bpb": bpb["mean"],
            "val_bpb_stderr": bpb["sd"] / n ** 0.5 if n > 1 else None,
            "bytes_total": largest["total_bytes"], "bytes_code": largest["code"]["bytes"],
            "seeds": [r.seed for r in runs], "val_bpb_per_seed": [s["bpb"] for s in scores],
            "bytes_total_per_seed": [r.artifact_meta["total_bytes"] for r in runs],
            "policy": cfg.policy, "eval_mode": cfg.mode}


def readme(runs: list[SeedRun], info: dict, modes: list[str], cfg: SubmissionConfig,
           run_name: str) -> str:
    """What was run, the results table and how to reproduce it."""
    lines = [f"# {info['name']}", "", info["blurb"], "",
             f"Score: **val_bpb {info['val_bpb']:.5f}** ({cfg.mode} eval, mean of "
             f"{len(runs)} seed(s)"
             + (f", SE {info['val_bpb_stderr']:.5f}" if info["val_bpb_stderr"] else "")
             + f"); at most {info['bytes_total']:,} bytes (artifact + {info['bytes_code']:,} B "
             "of code).", "",
             "| seed | " + " | ".join(modes) + " | artifact B | total B | train steps | train s |",
             "|" + "---|" * (len(modes) + 5)]
    for r in runs:
        meta, train = r.artifact_meta, read_json(r.train)
        lines.append(f"| {r.seed} | " + " | ".join(f"{r.evals[m]['bpb']:.5f}" for m in modes)
                     + f" | {meta['artifact_bytes']:,} | {meta['total_bytes']:,} | "
                     f"{train['steps']} | {train['train_seconds']:.0f} |")
    lines += ["", "## How it was run", "",
              f"pgolf (a Snakemake pipeline), run `{run_name}`, allocation policy "
              f"`{cfg.policy}`. The model config and training settings are in each seed's "
              "`logs/train_seed<S>.json` (and the model config in the artifact's header); every "
              "number above is read from the pipeline's eval outputs, which score the artifact "
              "as read back from disk.", "",
              "## Reproduce", "",
              "From this folder, per seed (with upstream's data, or DATA_PATH and "
              "TOKENIZER_PATH set):", "",
              f"    SEED={runs[0].seed} torchrun --standalone --nproc_per_node=<train.nproc> "
              "train_gpt.py", "",
              "or the whole pipeline:", "",
              "    pip install -c constraints.txt -e .",
              "    snakemake --cores all --configfile <the run's config files>",
              "    pgolf audit results/<run>/seed<S>/artifact/<policy>.pgz   # its lineage", "",
              "## Files", "",
              "- `train_gpt.py`: the whole submission's code (pgolf's modules embedded, this "
              "run's settings and allocations frozen in): it trains, packs `final_model.pgz` "
              "and scores it; its size is the code bytes above",
              "- `submission.json`: the fields upstream reads, plus per-seed detail",
              "- `artifact_seed<S>.pgz`: the packed model of each seed",
              "- `logs/`: each seed's train summary (`train_seed<S>.json`), train and eval logs"]
    return "\n".join(lines) + "\n"


def script(runs: list[SeedRun], spec: dict, names: list[str], src: Path = SRC) -> bytes:
    """train_gpt.py with the seeds' allocations frozen in; its size must be the code bytes the
    artifact stage gated on (the DAG counted the same file, placeholders in its fixed-width
    allocation field)."""
    data, _ = render(spec, [read_json(r.allocation) for r in runs], names=names, src=src)
    for r in runs:
        counted = r.artifact_meta["code"]["bytes"]
        if counted != len(data):
            raise ValueError(f"train_gpt.py is {len(data):,} B but seed {r.seed}'s artifact "
                             f"counted {counted:,} B of code: rerun its artifact stage")
    return data


def export_submission(runs: list[SeedRun], out: Path, *, cfg: SubmissionConfig,
                      modes: list[str], run_name: str, code: bytes) -> dict:
    """Write the folder (with `code` as train_gpt.py) next to `out`, then move it into place
    (a failure leaves nothing)."""
    if cfg.mode not in modes:
        raise ValueError(f"submission.mode = {cfg.mode!r} is not among eval.modes {modes}")
    info = fields(runs, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".submission-", dir=out.parent))
    try:
        (staging / "logs").mkdir()
        for r in runs:
            shutil.copyfile(r.artifact, staging / f"artifact_seed{r.seed}.pgz")
            shutil.copyfile(r.train, staging / "logs" / f"train_seed{r.seed}.json")
            for log in map(Path, r.logs):
                if log.is_file():
                    shutil.copyfile(log, staging / "logs" / log.name)
        (staging / "train_gpt.py").write_bytes(code)
        write_json(staging / "submission.json", info)
        (staging / "README.md").write_text(readme(runs, info, modes, cfg, run_name))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def load_runs(seeds: list[int], *, evals: list, artifacts: list, train: list, policy: str,
              modes: list[str], logs: Path, allocations: list | None = None) -> list[SeedRun]:
    """The seeds' outputs (eval paths seed-major, then mode; the rest one per seed; each
    artifact's JSON beside it) and their logs."""
    runs = []
    for i, s in enumerate(seeds):
        mine = evals[i * len(modes):(i + 1) * len(modes)]
        artifact = Path(artifacts[i])
        runs.append(SeedRun(
            seed=s, evals={m: read_json(p) for m, p in zip(modes, mine, strict=True)},
            artifact=artifact, artifact_meta=read_json(artifact.with_suffix(".json")),
            train=Path(train[i]), allocation=Path(allocations[i]) if allocations else None,
            logs=[logs / f"train_seed{s}.log", logs / f"eval_seed{s}_prequant.log",
                  *(logs / f"eval_seed{s}_{policy}_{m}.log" for m in modes if m != "prequant")]))
    return runs
