"""Content hash of the code a stage runs: a script plus every pgolf module it imports, transitively.

Snakemake tracks `script:` files by mtime and does not see imported modules at all, so each rule
passes this hash as a `params:` value instead: an edit reruns the stage, a `touch` or a branch
switch that restores the same bytes does not. Stdlib only: it runs at every DAG build.
"""

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pgolf"


def import_closure(*scripts: str | Path, src: str | Path) -> list[Path]:
    """The given files and every pgolf module under `src` they import, transitively, sorted."""
    src = Path(src)
    files = set()
    pending = [Path(s) for s in scripts]
    while pending:
        path = pending.pop()
        if path in files:
            continue
        files.add(path)
        pending.extend(_imported_modules(path, src))
    return sorted(files, key=lambda p: _label(p, src))


def code_hash(*scripts: str | Path, src: str | Path) -> str:
    """sha256 over the given files and the pgolf modules under `src` they import (transitively)."""
    src = Path(src)
    digest = hashlib.sha256()
    for path in import_closure(*scripts, src=src):
        digest.update(_label(path, src).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _label(path: Path, src: Path) -> str:
    # Relative names keep the hash stable when the checkout moves.
    try:
        return str(path.resolve().relative_to(src.resolve()))
    except ValueError:
        return path.name


@functools.cache  # every stage imports the same few modules; parse each once per DAG build
def _imported_modules(path: Path, src: Path) -> list[Path]:
    found = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            rel = ".".join(base.resolve().relative_to(src.resolve()).parts)
            module = f"{rel}.{node.module}" if node.module else rel
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.extend(_module_files(name, src))
    return found


def _module_files(name: str, src: Path) -> list[Path]:
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return []
    # Importing a.b.c runs the __init__ of every package on the way, so each of them counts.
    files = []
    for i in range(1, len(parts)):
        init = src.joinpath(*parts[:i], "__init__.py")
        if not init.exists():
            return []
        files.append(init)
    module = src.joinpath(*parts)
    if (module / "__init__.py").exists():
        files.append(module / "__init__.py")
    elif module.with_suffix(".py").exists():
        files.append(module.with_suffix(".py"))
    return files
