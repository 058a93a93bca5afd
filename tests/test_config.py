"""Config schema: defaults, errors that name the file and value, and every preset dry-runs."""

import re
from pathlib import Path

import pytest
import yaml

from pgolf.config import load_config, section
from pgolf.data.tokenizer import TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_demo_config_fills_defaults():
    config = load_config(ROOT / "config.yaml")
    assert config["run"] == "demo" and config["tokenizer"]["vocab_size"] == 1024
    assert config["tokenizer"]["character_coverage"] == 0.999  # schema default
    assert config["corpus"]["hf"]["repo_id"] == "willdepueoai/parameter-golf"


def test_defaults_are_not_shared_between_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: a\n")
    first = load_config(path)
    first["seeds"].append(99)
    assert load_config(path)["seeds"] == [1, 2]


@pytest.mark.parametrize("text,words", [
    ("tokenizer:\n  vocab_size: 70000\n", ["tokenizer.vocab_size = 70000", "maximum of 65535"]),
    ("shards:\n  val_docs: 0\n", ["shards.val_docs = 0"]),
    ("scores:\n  scorer: gzip\n", ["scores.scorer = 'gzip'"]),
    ("manifest:\n  buckets: 3\n", ["'buckets' was unexpected"]),
    ("run: 'a b'\n", ["run = 'a b'"]),
])
def test_errors_name_file_key_and_value(tmp_path, text, words):
    path = tmp_path / "override.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(ROOT / "config.yaml", path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_later_files_win_and_merge_nested(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump({"tokenizer": {"vocab_size": 2048}}))
    config = load_config(ROOT / "config.yaml", path)
    assert config["tokenizer"]["vocab_size"] == 2048 and config["shards"]["val_docs"] == 11


def test_sections_reject_unknown_keys():
    assert section(TokenizerConfig, {"vocab_size": 512}).vocab_size == 512
    with pytest.raises(ValueError, match=r"tokenizer: unknown keys \['vocab'\]"):
        section(TokenizerConfig, {"vocab": 512}, "tokenizer")


OVERLAYS = {"h100x1.yaml": ["record-8xh100.yaml"]}  # presets that sit on top of another


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_validate_and_dry_run(workflow, preset):
    files = [ROOT / "configs" / base for base in OVERLAYS.get(preset.name, [])] + [preset]
    load_config(ROOT / "config.yaml", *files)
    result = workflow.run("-n", config=files)
    assert "train" in result.stdout and "Job stats:" in result.stdout
    merged = load_config(ROOT / "config.yaml", *files)
    train = merged["train"]
    if train["device"] != "cpu":  # local GPU jobs claim their own devices
        assert f"pgolf.gpuslots --gpus {train['nproc']} -- torchrun" in result.stdout
    gpus = planned_gpus(result.stdout)
    assert gpus["train"] == {train["nproc"] if train["device"] != "cpu" else 0}
    for rule, key in (("sweep", "sweep"), ("hessians", "hessian"), ("eval", "eval")):
        settings = merged[key]
        assert gpus[rule] == {settings.get("nproc", 1) if settings["device"] != "cpu" else 0}
    assert gpus["shards"] == gpus["artifact"] == {0}


def planned_gpus(dry_run: str) -> dict[str, set[int]]:
    """The `gpu` resource of every planned job, by rule (0 when the job has none)."""
    gpus = {}
    for block in re.split(r"\n(?:local)?rule ", dry_run)[1:]:
        rule = block.split(":", 1)[0]
        found = re.search(r"resources:.*\bgpu=(\d+)", block)
        gpus.setdefault(rule, set()).add(int(found.group(1)) if found else 0)
    return gpus


def schema_defaults(spec: dict) -> dict:
    return {k: schema_defaults(v) if v.get("type") == "object" and "properties" in v
            else v.get("default") for k, v in spec["properties"].items()}


def test_schema_defaults_equal_the_dataclass_defaults():
    import dataclasses

    from pgolf.eval.phased import LoRATTTConfig
    from pgolf.model.gpt import GPTConfig
    from pgolf.train.trainer import TrainConfig

    spec = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    defaults = schema_defaults(spec)
    model = dataclasses.asdict(GPTConfig())
    del model["vocab_size"]  # comes from tokenizer.vocab_size
    assert defaults["model"] == model
    assert defaults["train"] == dataclasses.asdict(TrainConfig())
    assert defaults["tokenizer"] == dataclasses.asdict(TokenizerConfig())
    assert defaults["lora_ttt"] == dataclasses.asdict(LoRATTTConfig())
