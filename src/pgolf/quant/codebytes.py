"""What counts as code bytes, counted as the records count theirs (torch-free: the DAG reads it).

Code bytes are the source a submission needs to decode the artifact and evaluate it: the import
closure of the artifact reader, the model and the BPB evaluation, bundled, compressed with
brotli-11, base85-encoded and wrapped in a two-line `exec` loader, as the upstream SOTA record
counts its code (it also minifies first, so this count is, if anything, high).
"""

import base64
from pathlib import Path

import brotli

from pgolf.codehash import import_closure

CHALLENGE_BYTES = 16_000_000  # artifact + code bytes must fit this
SRC = Path(__file__).resolve().parents[2]  # the source tree this code runs from
DECODER_ENTRY = ("pgolf/quant/artifact.py", "pgolf/model/gpt.py", "pgolf/eval/ttt.py")
WRAPPER = "import base64,brotli\nexec(brotli.decompress(base64.b85decode({!r})))\n"


def model_code(kernels: str) -> tuple[str, ...]:
    """The entry modules a model imports by name: model.kernels: triton's fused kernels (TTT
    trains with them, so they are evaluator code)."""
    return ("pgolf/kernels/__init__.py",) if kernels == "triton" else ()


def code_bytes(src: Path = SRC, extra: tuple[str, ...] = ()) -> dict:
    """Counted bytes of the decoder/evaluator source (plus `extra` entry modules, such as an
    optional codec the artifact uses), and the files they come from."""
    src = Path(src)
    files = import_closure(*(src / e for e in (*DECODER_ENTRY, *extra)), src=src)
    bundle = b"".join(f"# {f.relative_to(src)}\n".encode() + f.read_bytes() for f in files)
    packed = base64.b85encode(brotli.compress(bundle, quality=11))
    wrapper = WRAPPER.format(packed.decode()).encode()
    return {"bytes": len(wrapper), "source_bytes": len(bundle),
            "files": [str(f.relative_to(src)) for f in files]}
