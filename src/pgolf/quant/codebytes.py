"""What counts as code bytes: the size of the exported records/ train_gpt.py (torch-free: the DAG
reads it).

A submission's code is the one train_gpt.py the submission stage writes (pgolf.bundle: the
standalone program's import closure, LZMA + base85 in a self-extracting wrapper, as R0409 ships
its code). The file's allocation field has a fixed width, so the count is exact before any
allocation exists: the DAG computes it once per build and hands the number to the allocation
budget and the artifact stage's size gate, and the submission stage checks that the file it
writes has exactly that size.
"""

from pathlib import Path

from pgolf.bundle import render

CHALLENGE_BYTES = 16_000_000  # artifact + code bytes must fit this
SRC = Path(__file__).resolve().parents[2]  # the source tree this code runs from


def code_bytes(spec: dict, *, names: list[str], src: Path = SRC) -> dict:
    """Size of the train_gpt.py exported for `spec` (pgolf.bundle.render), the bytes of the
    sources it embeds, and their files."""
    src = Path(src)
    data, files = render(spec, None, names=names, src=src)
    return {"bytes": len(data), "source_bytes": sum((src / f).stat().st_size for f in files),
            "files": files}
