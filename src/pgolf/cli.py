"""The `pgolf` command: inspect shards, check configs, audit outputs and import upstream
checkpoints without running the workflow."""

import argparse
import sys

import numpy as np


def shard_info(paths: list[str], bos_id: int) -> None:
    from pgolf.data.shards import read_shard

    for path in paths:
        tokens = read_shard(path)
        docs = int(np.count_nonzero(tokens == bos_id))
        top = int(tokens.max()) if len(tokens) else None
        print(f"{path}: {len(tokens)} tokens, {docs} documents (BOS={bos_id}), max id {top}")


def check_config(paths: list[str]) -> None:
    from pgolf.config import load_config

    config = load_config(*paths)
    print(f"{', '.join(paths)}: valid (run {config['run']!r}, seeds {config['seeds']})")


def audit(path: str, root: str | None) -> int:
    from pgolf.audit import audit as trace

    result = trace(path, root)
    print("\n".join(result.lines))
    print(result.summary())
    for problem in result.problems:
        print(f"pgolf: error: {problem}", file=sys.stderr)
    return 1 if result.problems else 0


def import_model(checkpoint: str, configs: list[str], out: str) -> None:
    from pgolf.config import load_config, section
    from pgolf.model.config import GPTConfig
    from pgolf.model.importer import import_checkpoint

    config = load_config(*configs)
    cfg = section(GPTConfig, {**config["model"], "vocab_size": config["tokenizer"]["vocab_size"]},
                  "model")
    model = import_checkpoint(checkpoint, cfg, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {params} parameters from {checkpoint} (looping {model.looping})")


def grid_suggest(results: str, candidates: str, base_config: list[str] | None,
                 policy: str | None, mode: str | None) -> None:
    import yaml

    from pgolf.config import load_config
    from pgolf.eval.greedy import candidates_from, render, suggest
    from pgolf.io import read_json

    with open(candidates) as f:
        spec = candidates_from(yaml.safe_load(f))
    config = load_config(*base_config) if base_config else None
    print(render(*suggest(read_json(results), spec, policy=policy, mode=mode,
                          base_config=config)), end="")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgolf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("shard-info", help="validate upstream-format shards and count tokens")
    info.add_argument("paths", nargs="+")
    info.add_argument("--bos-id", type=int, default=1)
    check = sub.add_parser("check-config", help="validate config files (merged in order)")
    check.add_argument("paths", nargs="+")
    lineage = sub.add_parser("audit", help="trace an output's provenance back to the corpus and "
                             "verify the recorded sha256s (exit 1 on a mismatch)")
    lineage.add_argument("path")
    lineage.add_argument("--root", help="folder the recorded paths are relative to (default: "
                         "the one holding results/)")
    imports = sub.add_parser("import", help="turn an upstream record's final_model.pt (a torch "
                             "state dict) into a pgolf model.safetensors")
    imports.add_argument("checkpoint")
    imports.add_argument("--config", nargs="+", required=True,
                         help="pgolf config files (merged in order) whose model section and "
                         "tokenizer.vocab_size describe the checkpoint's model")
    imports.add_argument("--out", required=True)
    grid = sub.add_parser("grid", help="work with a finished variant grid")
    suggest = grid.add_subparsers(dest="grid_command", required=True).add_parser(
        "suggest", help="print the next greedy one-at-a-time variant overlays as YAML")
    suggest.add_argument("--results", required=True, help="the grid's variants.json")
    suggest.add_argument("--candidates", required=True, help="YAML: a list of {key: value} "
                         "mappings or a mapping key -> list of values (dotted keys)")
    suggest.add_argument("--base-config", nargs="+", help="config files (merged in order) the "
                         "candidate keys must exist in")
    suggest.add_argument("--policy", help="policy to select on (default: the first)")
    suggest.add_argument("--mode", help="eval mode to select on (default: the last one run)")
    args = parser.parse_args(argv)
    try:
        if args.command == "shard-info":
            shard_info(args.paths, args.bos_id)
        elif args.command == "audit":
            return audit(args.path, args.root)
        elif args.command == "grid":
            grid_suggest(args.results, args.candidates, args.base_config, args.policy, args.mode)
        elif args.command == "import":
            import_model(args.checkpoint, args.config, args.out)
        else:
            check_config(args.paths)
    except ValueError as err:
        print(f"pgolf: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
