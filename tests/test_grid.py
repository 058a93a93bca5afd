"""The ablation grid: variant configs, per-stage keys, and the table against rules/*.smk."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from pgolf.config import load_config
from pgolf.grid import STAGES, shared_stages, stage_keys, variant_configs

ROOT = Path(__file__).resolve().parents[1]
DATA = {"corpus", "hub_shards", "tokenizer", "shards", "window_scores", "curriculum"}


def demo(**variants):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["variants"] = variants
    return config


def differing(shared):
    """Stages whose variants do not all share one key."""
    return {stage for stage, keys in shared.items() if len(keys) > 1}


def test_ttt_lr_shares_everything_but_the_ttt_evals():
    configs = variant_configs(demo(slow={"ttt": {"lr": 0.005}}))
    # the exported program's size is the same number for both (the value the rules pass)
    code = {name: {"bytes": 123456} for name in configs}
    shared = shared_stages(configs, code_bytes=code)
    assert differing(shared) == {"eval:uniform:ttt", "eval:rd:ttt", "seeds", "submission"}
    assert list(shared["train"].values()) == [["base", "slow"]]  # one train per seed
    assert len(shared["eval:rd:ttt"]) == 2
    # without the value: ttt is the submission's mode, so its slices are in the exported program
    assert {"code_bytes", "artifact:uniform"} <= differing(shared_stages(configs))


def test_model_change_keeps_only_the_data_stages_shared():
    configs = variant_configs(demo(wide={"model": {"model_dim": 192}}))
    shared = shared_stages(configs)
    assert set(shared) - differing(shared) == DATA


def test_rd_budget_changes_rd_and_what_follows_only():
    configs = variant_configs(demo(fixed={"allocate": {"rd": {"budget": 50000}}}))
    code = {name: {"bytes": 1} for name in configs}
    assert differing(shared_stages(configs, code_bytes=code)) == {
        "allocate:rd", "artifact:rd", "eval:rd:roundtrip", "eval:rd:sliding", "eval:rd:ttt",
        "seeds", "submission", "allocation_plots", "analysis_loops", "analysis_generation",
        "analysis_damage",
    }


def test_rd_challenge_budget_reads_the_code_bytes():
    config = variant_configs(demo(challenge={"allocate": {"rd": {"budget": "challenge"}}}))
    config = config["challenge"]
    one, two = (stage_keys(config, code_bytes={"bytes": n}) for n in (100, 101))
    assert one["allocate:rd"] != two["allocate:rd"]
    assert one["allocate:uniform"] == two["allocate:uniform"]


def test_upstream_change_reaches_every_downstream_key():
    # the tokenizer holds out shards.val_docs: everything from the tokenizer on changes
    configs = variant_configs(demo(val={"shards": {"val_docs": 12}}))
    shared = shared_stages(configs)
    # (the exported program carries no shards settings)
    assert set(shared) - differing(shared) == {"corpus", "hub_shards", "code_bytes"}


def test_prequant_key_is_one_per_seed_across_policies():
    keys = stage_keys(variant_configs(demo())["base"])
    assert keys["eval:uniform:prequant"] == keys["eval:rd:prequant"]
    assert keys["eval:uniform:roundtrip"] != keys["eval:rd:roundtrip"]


@pytest.mark.parametrize("key, value", [("run", "x"), ("seeds", [3]), ("variants", {})])
def test_reserved_keys_name_the_variant(key, value):
    with pytest.raises(ValueError, match=rf"variants\.bad\.{key} = .*cannot set {key}"):
        variant_configs(demo(good={"ttt": {"lr": 0.1}}, bad={key: value}))


def test_unknown_key_names_the_variant_and_key():
    with pytest.raises(ValueError, match=r"variants\.odd: .*model.*'bogus' was unexpected"):
        variant_configs(demo(odd={"model": {"bogus": 1}}))


def test_identical_variants_name_both():
    with pytest.raises(ValueError, match=r"variants\.b: the same effective config as 'a'"):
        variant_configs(demo(a={"ttt": {"lr": 0.1}}, b={"ttt": {"lr": 0.1}}))
    # setting a value to what the base config already has is the base config again
    with pytest.raises(ValueError, match=r"variants\.same: .* as 'base'"):
        variant_configs(demo(same={"ttt": {"lr": 0.05}}))


def test_no_variants_is_todays_config():
    today = load_config(ROOT / "config.yaml")
    assert today["variants"] == {}
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    configs = variant_configs(copy.deepcopy(raw))
    assert configs == {"base": today}
    assert stage_keys(configs["base"]) == stage_keys(load_config(ROOT / "config.yaml"))


def rule_params():
    """{rule: the config slices its params name literally} from rules/*.smk."""
    params = {}
    for path in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0]
            body = re.search(r"^    params:\n((?:        .*\n)+)", block, flags=re.M)
            text = body.group(1) if body else ""
            slices = {".".join(filter(None, m))
                      for m in re.findall(r'config\["(\w+)"\](?:\["(\w+)"\])?', text)}
            for args in re.findall(r"sweep_params\(([^)]*)\)", text):
                slices |= {f"sweep.{key}" for key in re.findall(r'"(\w+)"', args)}
            params[name] = slices
    return params


def test_table_follows_the_rules():
    params = rule_params()
    assert set(params) == {stage.rule for stage in STAGES.values() if stage.rule}
    for rule, slices in params.items():
        reads = {read for stage in STAGES.values() if stage.rule == rule for read in stage.reads}
        missing = {s for s in slices
                   if not any(s == r or s.startswith(f"{r}.") for r in reads)}
        assert not missing, f"rule {rule} reads {sorted(missing)}: add them to pgolf.grid.STAGES"


def test_keys_only_for_the_configured_policies_and_modes():
    configs = variant_configs(demo(lean={"allocate": {"policies": ["uniform"]},
                                         "eval": {"modes": ["prequant", "roundtrip"]}}))
    keys = stage_keys(configs["lean"])
    assert not [name for name in keys if "rd" in name.split(":") or name.endswith("ttt")]
    assert {"allocate:uniform", "eval:uniform:roundtrip", "eval:uniform:prequant"} <= set(keys)
    base = stage_keys(configs["base"])
    assert keys["allocate:uniform"] == base["allocate:uniform"]
    assert keys["seeds"] != base["seeds"]


def common_helper(name, config):
    """A spec helper of rules/common.smk, run against `config` (it reads the global config)."""
    import ast

    tree = ast.parse((ROOT / "rules" / "common.smk").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"config": config, "json": json}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "common.smk", "exec"), namespace)
    return namespace[name]


def test_eval_modes_read_what_eval_spec_passes():
    config = variant_configs(demo())["base"]
    eval_spec = common_helper("eval_spec", config)
    for mode in ("prequant", "roundtrip", "sliding", "ttt", "phased_ttt"):
        spec = json.loads(eval_spec(mode))
        spec["eval.guard"] = spec.pop("guard", {})  # eval_spec passes eval.guard as `guard`
        slices = {f"{section}.{key}" for section, values in spec.items() for key in values}
        reads = STAGES[f"eval:{{policy}}:{mode}"].reads
        missing = {s for s in slices if not any(s == r or s.startswith(f"{r}.") for r in reads)}
        assert not missing, f"eval_spec({mode!r}) passes {sorted(missing)}"
