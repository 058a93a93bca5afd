"""The exported records/ train_gpt.py: pgolf's modules embedded, the run's settings frozen in.

Stdlib only (the DAG build counts its size). The file is

    '''pgolf run <run>: ...'''                     a docstring: how to run it
    import base64,lzma
    A="<base85>"                                   the seeds' allocations, fixed width
    C='{"eval":...}'                               the frozen settings, as JSON
    exec(lzma.decompress(base64.b85decode("...")))  the payload: code only

and the payload registers the sources of pgolf.standalone's import closure (plus the optional
codec the artifact names by module path) with a finder placed first on sys.meta_path, then runs
pgolf.standalone.main with the frozen settings. The modules keep their own names: embedded, not
flattened or renamed, the code that runs upstream is the pipeline's code (importlib strings such
as the optional codecs' module paths resolve unchanged), so the two cannot drift. Each source
goes through an ast round trip that drops comments and function docstrings (minify: about a
fifth fewer code bytes, the same program). An already imported pgolf is refused, so an installed
copy can never stand in.

The allocations sit outside the compressed payload as fixed-size entries, so the file's size is
known before any allocation exists: the DAG counts it (pgolf.quant.codebytes), the allocation
and artifact stages budget and gate on it, and the submission stage writes the same number of
bytes. The settings sit outside it too, as plain JSON, so an edit that keeps their text's length
(ttt.lr 0.01 -> 0.02, eval.stride 16 -> 32) keeps the count, and reruns no packing; compressed,
any edit could move the count by a byte.
"""

import ast
import base64
import json
import lzma
import math
import struct
from pathlib import Path

from pgolf.codehash import import_closure

ENTRY = "pgolf/standalone.py"
# one matrix: bits (0 = kept float), clip sigmas (NaN = search), LQER rank (0 = none)
ALLOCATION = struct.Struct("<BdB")
PAYLOAD = '''import importlib.abc, importlib.util, json, sys
S = {sources}
F = {files}
class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in S:
            package = F[name].endswith("__init__.py")
            return importlib.util.spec_from_loader(name, self, is_package=package)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        name = module.__name__
        module.__file__ = F[name]
        exec(compile(S[name], "train_gpt.py:" + F[name], "exec"), module.__dict__)
    def get_source(self, name):
        return S[name]
if any(m == "pgolf" or m.startswith("pgolf.") for m in sys.modules):
    raise RuntimeError("train_gpt.py: pgolf is already imported; run this file by itself")
sys.meta_path.insert(0, Finder())
from pgolf.standalone import main
raise SystemExit(main(json.loads(C), A, __file__))
'''
HEAD = '''"""pgolf run {run}: a Parameter Golf submission exported by pgolf (its size = code bytes).
Trains, quantizes at the run's frozen allocation, packs final_model.pgz and scores it ({mode}):
SEED=<{seeds}> DATA_PATH=<shards> TOKENIZER_PATH=<.model> torchrun --standalone \\
--nproc_per_node={nproc} train_gpt.py   (or DATA_DIR=./data/ with the records' layout)"""
import base64,lzma
'''


def encode_allocations(allocations: list[dict], names: list[str]) -> str:
    """The seeds' allocations (bits, clip_sigmas and LQER ranks per name, as the allocation JSON
    holds them) as base85 of fixed-size entries in `names` order: the length depends on the
    counts only."""
    raw = b"".join(ALLOCATION.pack(int(a["bits"].get(n, 0)),
                                   float(a.get("clip_sigmas", {}).get(n, math.nan)),
                                   int(a.get("lqer", {}).get(n, 0)))
                   for a in allocations for n in names)
    return base64.b85encode(raw).decode()


def decode_allocation(text: str, names: list[str], index: int) -> tuple[dict, dict, dict]:
    """Bits, clips and LQER ranks of the `index`-th seed from encode_allocations' text."""
    raw = base64.b85decode(text)
    bits, clips, ranks = {}, {}, {}
    for i, name in enumerate(names):
        b, k, r = ALLOCATION.unpack_from(raw, (index * len(names) + i) * ALLOCATION.size)
        if b:
            bits[name] = b
            if not math.isnan(k):
                clips[name] = k
            if r:
                ranks[name] = r
    return bits, clips, ranks


def minify(source: str) -> str:
    """The same module without comments and function and class docstrings (its own docstring
    stays: argparse descriptions read __doc__)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def model_code(kernels: str) -> tuple[str, ...]:
    """The entry modules a model imports by name: model.kernels: triton's fused kernels (TTT
    trains with them, so they are evaluator code)."""
    return ("pgolf/kernels/__init__.py",) if kernels == "triton" else ()


def closure(spec: dict, src: Path) -> list[Path]:
    """The files the script embeds: pgolf.standalone's import closure and the modules imported
    by name: the optional codec, model.kernels: triton's fused kernels."""
    codec = spec["pack"].get("matrix_codec", "gptq")
    extra = [] if codec == "gptq" else [src / "pgolf" / "quant" / f"{codec}.py"]
    extra += [src / entry for entry in model_code(spec["model"].get("kernels", "eager"))]
    return import_closure(src / ENTRY, *extra, src=src)


def render(spec: dict, allocations: list[dict] | None, *, names: list[str],
           src: Path) -> tuple[bytes, list[str]]:
    """The script's bytes and the files it embeds. `allocations` (one per seed of spec["seeds"])
    None gives placeholders of the same width: a file of exactly the same size."""
    files = {".".join(Path(f.relative_to(src)).with_suffix("").parts).removesuffix(".__init__"):
             str(f.relative_to(src)) for f in closure(spec, src)}
    sources = {name: minify((src / rel).read_text()) for name, rel in sorted(files.items())}
    if allocations is None:
        allocations = [{"bits": {}} for _ in spec["seeds"]]
    if len(allocations) != len(spec["seeds"]):
        raise ValueError(f"{len(allocations)} allocations for seeds {spec['seeds']}")
    payload = PAYLOAD.format(sources=repr(sources), files=repr(dict(sorted(files.items()))))
    settings = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    packed = base64.b85encode(lzma.compress(payload.encode(), preset=9 | lzma.PRESET_EXTREME))
    head = HEAD.format(run=spec["run"], mode=spec["mode"], nproc=spec["train"].get("nproc", 1),
                       seeds="|".join(map(str, spec["seeds"])))
    text = (f'{head}A="{encode_allocations(allocations, names)}"\nC={settings!r}\n'
            f'exec(lzma.decompress(base64.b85decode("{packed.decode()}")))\n')
    return text.encode(), sorted(files.values())


def write_script(path: Path, spec: dict, allocations: list[dict], *, names: list[str],
                 src: Path) -> int:
    """Write the script; return its size in bytes."""
    data, _ = render(spec, allocations, names=names, src=src)
    Path(path).write_bytes(data)
    return len(data)
