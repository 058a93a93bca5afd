"""The project's own checks: ruff, snakefmt and Snakemake's linter are clean."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-m", "ruff", "check", "."],
    [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"],
    [sys.executable, "-m", "snakemake", "--lint"],
], ids=["ruff", "snakefmt", "snakemake-lint"])
def test_clean(cmd):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_scripts_stay_thin():
    for script in (ROOT / "workflow_scripts").glob("*.py"):
        assert len(script.read_text().splitlines()) <= 30, script.name


def test_functions_stay_short():
    import ast

    long = []
    for path in [*ROOT.glob("src/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("data/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_dag_build_does_not_import_torch():
    # rules/common.smk imports these on every snakemake call; torch would add ~1.5 s to each.
    code = ("import sys, pgolf.codehash, pgolf.config, pgolf.grid, pgolf.model.config,"
            " pgolf.quant.codebytes;"
            "assert 'torch' not in sys.modules, 'torch imported at DAG build'")
    subprocess.run([sys.executable, "-c", code], check=True)
