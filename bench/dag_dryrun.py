"""Time `snakemake -n` (DAG build and up-to-date check) in a folder whose run is finished.

    python bench/dag_dryrun.py [--configfile config.yaml] [--repeat 5]

Run it after `snakemake --cores all` has completed; it prints each wall time and the median.
"""

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default="config.yaml")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", args.configfile]
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - start)
    state = "up to date" if "Nothing to be done" in out else "NOT up to date (jobs pending)"
    print(f"snakemake -n ({state}): " + " ".join(f"{t:.2f}" for t in times)
          + f" s; median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
