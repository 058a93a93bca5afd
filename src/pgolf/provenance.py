"""Provenance records: config slice, code hash, input hashes, package versions, host and times."""

import importlib.metadata
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pgolf.io import sha256_file

PACKAGES = ("pgolf", "torch", "numpy", "sentencepiece", "pyarrow", "zstandard", "brotli",
            "safetensors", "snakemake")


def package_versions() -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_hashes(paths) -> dict[str, str]:
    """sha256 of every input file; a directory contributes each file inside it."""
    hashes = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if not f.name.startswith("."):
                hashes[str(f)] = sha256_file(f)
    return hashes


class Provenance:
    """Collects what a stage ran with; `record()` returns the dict that goes into its sidecar."""

    def __init__(self, *, stage: str, config: dict, code: str | None, inputs=()):
        self.stage = stage
        self.config = config
        self.code = code
        self.inputs = list(inputs)
        self.start = time.time()

    def record(self) -> dict:
        return {
            "stage": self.stage,
            "config": self.config,
            "code_hash": self.code,
            "inputs": input_hashes(self.inputs),
            "packages": package_versions(),
            "host": {"name": socket.gethostname(), "platform": platform.platform(),
                     "cpus": os.cpu_count()},
            "start": _iso(self.start),
            "end": _iso(time.time()),
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
