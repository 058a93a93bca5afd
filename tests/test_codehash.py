"""The code hash that triggers reruns: content of a script and the pgolf modules it imports."""

import os

from pgolf.codehash import code_hash


def make_package(root):
    src = root / "src"
    files = {
        "pgolf/__init__.py": "",
        "pgolf/io.py": "X = 1\n",
        "pgolf/data/__init__.py": "",
        "pgolf/data/shards.py": "from pgolf.io import X\n",
        "pgolf/data/scores.py": "from .shards import X\nimport numpy\n",
        "pgolf/data/manifest.py": "from pgolf.data import scores\n",
        "pgolf/unrelated.py": "Y = 2\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    script = root / "stage.py"
    script.write_text("from pgolf.data.manifest import *\n")
    return src, script


def test_follows_imports_transitively(tmp_path):
    src, script = make_package(tmp_path)
    before = code_hash(script, src=src)
    for name in ["pgolf/io.py", "pgolf/data/shards.py", "pgolf/data/__init__.py"]:
        path = src / name
        original = path.read_text()
        path.write_text(original + "# edit\n")
        assert code_hash(script, src=src) != before, name
        path.write_text(original)
    assert code_hash(script, src=src) == before


def test_ignores_modules_not_imported_and_mtimes(tmp_path):
    src, script = make_package(tmp_path)
    before = code_hash(script, src=src)
    (src / "pgolf/unrelated.py").write_text("Y = 3\n")
    for path in [*src.rglob("*.py"), script]:
        os.utime(path, (1, 1))
    assert code_hash(script, src=src) == before


def test_stable_when_the_checkout_moves(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert code_hash(make_package(a)[1], src=a / "src") == code_hash(make_package(b)[1],
                                                                      src=b / "src")


def test_real_stages_hash_different_code():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = root / "workflow_scripts"
    hashes = {p.name: code_hash(p, src=root / "src") for p in scripts.glob("*.py")}
    assert len(set(hashes.values())) == len(hashes)
