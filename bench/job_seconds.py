"""Where a finished run's time went: job seconds per stage, from Snakemake's benchmark files.

    python bench/job_seconds.py results/demo          # or results/h100x1 after a GPU run

Every rule writes results/<run>/benchmarks/<stage>[_seed<S>...].tsv (wall seconds, peak RSS, CPU
seconds of the job). This sums them per stage and prints the sweep's cost relative to one
evaluation: a seed's whole sweep (baseline, every matrix, block groups) over the mean seconds of
a roundtrip eval job, which scores the whole validation split once from an artifact. Job seconds
include each job's start-up (Python and torch: about 2.5 s on the demo's CPU), which is why they
are printed per job too.
"""

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

SWEEP = ("sweep_baseline", "sweep", "block_groups")


def read_jobs(folder: Path) -> list[dict]:
    jobs = []
    for path in sorted(folder.glob("*.tsv")):
        with path.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"), None)
        if row is None:
            raise ValueError(f"{path}: no benchmark row")
        per_seed = re.match(r"(.+?)_seed(\d+)(_|$)", path.stem)
        stage, seed = per_seed.group(1, 2) if per_seed else (path.stem, None)
        jobs.append({"name": path.stem, "stage": stage, "seed": seed,
                     "seconds": float(row["s"]), "rss_mb": float(row["max_rss"] or 0),
                     "cpu_seconds": float(row["cpu_time"] or 0)})
    if not jobs:
        raise ValueError(f"{folder}: no benchmark files (is it a finished run's folder?)")
    return jobs


def stage_table(jobs: list[dict]) -> None:
    stages = defaultdict(list)
    for job in jobs:
        stages[job["stage"]].append(job)
    total = sum(job["seconds"] for job in jobs)
    print(f"{'stage':26} {'jobs':>5} {'seconds':>9} {'share':>6} {'per job':>8} "
          f"{'cpu s':>8} {'max RSS MB':>10}")
    for stage, group in sorted(stages.items(), key=lambda kv: -sum(j["seconds"] for j in kv[1])):
        seconds = sum(j["seconds"] for j in group)
        print(f"{stage:26} {len(group):5d} {seconds:9.1f} {seconds / total:6.1%} "
              f"{seconds / len(group):8.2f} {sum(j['cpu_seconds'] for j in group):8.1f} "
              f"{max(j['rss_mb'] for j in group):10.0f}")
    print(f"{'all':26} {len(jobs):5d} {total:9.1f}")


def sweep_vs_eval(jobs: list[dict]) -> None:
    evals = [j["seconds"] for j in jobs
             if j["stage"] == "eval" and j["name"].endswith("_roundtrip")]
    if not evals:
        print("no roundtrip eval jobs: no sweep/eval ratio")
        return
    one_eval = sum(evals) / len(evals)
    for seed in sorted({j["seed"] for j in jobs if j["stage"] in SWEEP}):
        sweep = sum(j["seconds"] for j in jobs if j["stage"] in SWEEP and j["seed"] == seed)
        count = sum(j["stage"] in SWEEP and j["seed"] == seed for j in jobs)
        print(f"seed {seed}: sweep {sweep:.1f} s in {count} jobs = {sweep / one_eval:.1f} x one "
              f"roundtrip eval job ({one_eval:.1f} s, mean of {len(evals)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="results/<run>")
    args = parser.parse_args()
    jobs = read_jobs(args.run_dir / "benchmarks")
    stage_table(jobs)
    sweep_vs_eval(jobs)


if __name__ == "__main__":
    main()
