"""GPU slots on one machine: a job claims distinct device indices through file locks.

Snakemake counts a local `--resources gpu=N` but never says which device a job may use, so two
one-GPU jobs would both see every device and both pick cuda:0. A job claims its GPUs here: one lock
file per device index under a machine-wide folder, held (flock) for the life of the process and
released by the kernel when it exits, however it exits; CUDA_VISIBLE_DEVICES then names exactly the
claimed indices. Inside a SLURM job the scheduler has already set CUDA_VISIBLE_DEVICES, so nothing
is claimed there; on a machine with no GPU at all nothing is claimed either (a `device: auto` job
then runs on the CPU).

Shell rules launch through the CLI; script rules call `hold` before torch touches CUDA:

    python -m pgolf.gpuslots --gpus 2 -- torchrun --standalone --nproc_per_node=2 -m pgolf.train ...

PGOLF_GPU_DEVICES overrides the device count (tests use fake devices) and PGOLF_GPU_LOCKS the
lock folder.
"""

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LOCKS = Path(os.environ.get("PGOLF_GPU_LOCKS")
                     or Path(tempfile.gettempdir()) / "pgolf-gpu-locks")
HELD: list[int] = []  # lock fds this process holds: open until it exits


def candidates(devices: int | None = None) -> list[str]:
    """Device indices a job may claim: CUDA_VISIBLE_DEVICES when the user restricted them, else
    0..devices-1 (`devices` given, else PGOLF_GPU_DEVICES, else nvidia-smi's count)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if devices is None:
        override = os.environ.get("PGOLF_GPU_DEVICES", "")
        if override and not override.isdigit():
            raise ValueError(f"PGOLF_GPU_DEVICES = {override!r}: a device count (0, 1, 2, ...)")
        devices = int(override) if override else count_gpus()
    return [str(i) for i in range(devices)]


def count_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def try_claim(n: int, pool: list[str], lock_dir: Path) -> tuple[list[str], list[int]] | None:
    """Claim n free devices of the pool at once, or none (every lock taken is released)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    ids, fds = [], []
    for device in pool:
        fd = os.open(lock_dir / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        ids.append(device)
        fds.append(fd)
        if len(ids) == n:
            return ids, fds
    for fd in fds:
        os.close(fd)
    return None


def claim(n: int, *, pool: list[str], lock_dir: Path = DEFAULT_LOCKS, timeout: float = 86400.0,
          poll: float = 0.2) -> tuple[list[str], list[int]]:
    """Wait until n devices of the pool are free and claim them: their ids and the lock fds that
    hold them (open until the process exits)."""
    if n > len(pool):
        raise ValueError(f"a job asks for {n} GPU(s), but this machine offers {len(pool)} "
                         f"({', '.join(pool) or 'none'}): lower the job's gpu resource or check "
                         "CUDA_VISIBLE_DEVICES")
    deadline = time.monotonic() + timeout
    while (claimed := try_claim(n, pool, lock_dir)) is None:
        # Snakemake's gpu resource keeps its own jobs within the pool; waiting here covers other
        # workflows (or a previous job's process still exiting) holding some of the devices.
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPU(s) among {pool} after {timeout:.0f} s "
                               f"(locks in {lock_dir})")
        time.sleep(poll)
    return claimed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pgolf.gpuslots", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="devices this job needs (0: none)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices on this machine (default: nvidia-smi's count)")
    p.add_argument("--lock-dir", type=Path, default=DEFAULT_LOCKS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given (put it after --)")
    return args


def hold(gpus: int, *, devices: int | None = None, lock_dir: Path = DEFAULT_LOCKS) -> list[str]:
    """Claim `gpus` devices for the rest of this process and make them its CUDA_VISIBLE_DEVICES
    (call it before torch first touches CUDA), and say which on stderr (the job's log). The ids
    claimed; none for CPU jobs, inside SLURM jobs and on machines without GPUs."""
    pool = candidates(devices) if gpus > 0 and "SLURM_JOB_ID" not in os.environ else []
    if not pool:
        return []
    torch = sys.modules.get("torch")
    assert torch is None or not torch.cuda.is_initialized(), "claim GPUs before CUDA starts"
    ids, fds = claim(gpus, pool=pool, lock_dir=lock_dir)
    HELD.extend(fds)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    print(f"pgolf.gpuslots: this job holds GPU {','.join(ids)}", file=sys.stderr, flush=True)
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        hold(args.gpus, devices=args.devices, lock_dir=args.lock_dir)
    except (ValueError, TimeoutError) as err:
        print(f"pgolf.gpuslots: error: {err}", file=sys.stderr)
        return 1
    for fd in HELD:
        os.set_inheritable(fd, True)  # the command holds the locks until it exits
    try:
        os.execvp(args.command[0], args.command)
    except FileNotFoundError:
        print(f"pgolf.gpuslots: error: command not found: {args.command[0]}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
