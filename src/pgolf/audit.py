"""`pgolf audit`: the lineage of an output back to the corpus, checked against the files on disk.

Every stage records its provenance (config slice, code hash, input sha256s, packages, host,
times) in its JSON sidecar, its parquet metadata or its safetensors header. The audit finds the
record that describes a file, checks that every recorded input still has its recorded sha256
(and that the files a record lists as its own outputs, such as shards.json's shards, do too),
and follows each input to its own record, down to the corpus.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from safetensors import safe_open

from pgolf.io import sha256_file

# Outputs whose provenance lives in a sidecar: name -> sidecar name, beside it
SIDECARS = {"model.safetensors": "train.json", "metrics.parquet": "train.json",
            "tokenizer.model": "tokenizer.json", "docs.jsonl": "docs.json",
            "curriculum.parquet": "curriculum.json"}


def record_file(path: Path) -> Path | None:
    """The file holding the provenance record that describes `path` (None for a source)."""
    if path.name in SIDECARS:
        return path.with_name(SIDECARS[path.name])
    if path.is_dir() and path.with_suffix(".json").is_file():  # data/shards -> shards.json
        return path.with_suffix(".json")
    if path.suffix == ".bin" and path.parent.with_suffix(".json").is_file():
        return path.parent.with_suffix(".json")
    if path.suffix in (".pgz", ".png", ".md"):
        for suffix in (".json", ".parquet"):
            if path.with_suffix(suffix).is_file():
                return path.with_suffix(suffix)
        return None
    return path if path.suffix in (".json", ".parquet", ".safetensors") else None


def read_record(path: Path) -> dict | None:
    """The provenance record stored in a JSON, parquet or safetensors file, if any."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".parquet":
            data = json.loads(pq.read_schema(path).metadata[b"pgolf"])
        else:
            with safe_open(str(path), framework="pt") as f:
                data = {"provenance": json.loads((f.metadata() or {}).get("provenance", "null"))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read its provenance ({err})") from None
    return data.get("provenance") if isinstance(data, dict) else None


def declared_outputs(record_path: Path) -> dict[Path, str]:
    """Files a record lists with their sha256 as its own outputs: docs.json's corpus and
    shards.json's shards (and CaseOps val byte sidecars)."""
    if record_path.name == "docs.json":
        return {record_path.with_suffix(".jsonl"): json.loads(record_path.read_text())["sha256"]}
    if record_path.name != "shards.json":
        return {}
    record = json.loads(record_path.read_text())
    files = [s for split in record.get("splits", {}).values()
             for s in split.get("shards", []) + (split.get("sidecars") or [])]
    folder = record_path.with_suffix("")
    return {folder / s["file"]: s["sha256"] for s in files}


@dataclass
class Audit:
    root: Path
    lines: list = field(default_factory=list)
    mismatches: dict = field(default_factory=dict)  # "file: what" -> records that say otherwise
    seen: set = field(default_factory=set)
    checked: int = 0
    corpus: tuple | None = None  # (docs.jsonl, docs.json) once the lineage reaches the corpus

    def resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.root / path

    def check(self, path: Path, expected: str, recorded_by: Path) -> str:
        self.checked += 1
        actual = sha256_file(path) if path.is_file() else None
        if actual == expected:
            return "ok"
        what = "missing" if actual is None else f"sha256 {actual[:16]}, recorded {expected[:16]}"
        self.mismatches.setdefault(f"{self.show(path)}: {what}", []).append(self.show(recorded_by))
        return "MISSING" if actual is None else "CHANGED"

    @property
    def problems(self) -> list[str]:
        """One line per file that no longer matches what the records say of it."""
        return [f"{what} (by {len(by)} record(s): {', '.join(by[:3])}"
                f"{', ...' if len(by) > 3 else ''})" for what, by in self.mismatches.items()]

    def show(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def trace(self, path: Path, depth: int = 0) -> None:
        """List the record of `path` and, recursively, of its inputs (each record once)."""
        pad = "  " * depth
        source = record_file(path)
        record = read_record(source) if source is not None and source.is_file() else None
        if record is None:
            self.lines.append(f"{pad}{self.show(path)}: a source (no provenance record)")
            return
        if source in self.seen:
            return
        self.seen.add(source)
        code = (record.get("code_hash") or "-")[:12]
        self.lines.append(f"{pad}{self.show(path)}: stage {record.get('stage')}, code {code}, "
                          f"{record.get('start')} on {(record.get('host') or {}).get('name')} "
                          f"(record {self.show(source)})")
        if source.name == "docs.json":
            self.corpus = (source.with_suffix(".jsonl"), json.loads(source.read_text()))
        for out, expected in declared_outputs(source).items():
            status = self.check(out, expected, source)
            self.lines.append(f"{pad}  {status} output {self.show(out)} sha256 {expected[:16]}")
        for name, expected in (record.get("inputs") or {}).items():
            input_path = self.resolve(name)
            status = self.check(input_path, expected, source)
            self.lines.append(f"{pad}  {status} {self.show(input_path)} sha256 {expected[:16]}")
            if status == "ok" and input_path.suffix != ".bin":
                self.trace(input_path, depth + 2)

    def summary(self) -> str:
        text = (f"{self.checked} recorded files checked against {len(self.seen)} provenance "
                "records")
        if self.corpus:
            docs, meta = self.corpus
            origin = (meta.get("origin") or {}).get("source", "")
            text += (f"\ncorpus: {self.show(docs)} sha256 {meta['sha256']} ({meta['count']} "
                     f"documents{', from ' + origin if origin else ''})")
        return text


def workflow_root(path: Path) -> Path:
    """The folder holding results/: recorded input paths are relative to it."""
    for parent in path.resolve().parents:
        if parent.name == "results":
            return parent.parent
    return Path.cwd()


def audit(path: str | Path, root: str | Path | None = None) -> Audit:
    """The lineage of `path`; `problems` lists every file that no longer matches its record."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    result = Audit(Path(root) if root else workflow_root(path))
    result.trace(path)
    return result
