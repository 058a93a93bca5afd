"""Variant-grid statistics (paired against the base, Holm, 2^k factorial), `pgolf grid suggest`."""

import json

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from pgolf.cli import main
from pgolf.eval.greedy import candidates_from, suggest
from pgolf.eval.variants import (
    factorial,
    holm,
    parse_path,
    variant_statistics,
    write_variant_statistics,
)

SEEDS = (1, 2, 3, 4)


def test_paired_against_base_matches_scipy():
    rng = np.random.default_rng(0)
    base = dict(zip(SEEDS, 1.1 + rng.normal(0, 0.01, 4), strict=True))
    a = {s: b - 0.005 + rng.normal(0, 0.002) for s, b in base.items()}
    a.pop(4)  # paired over the 3 common seeds only
    out = variant_statistics({"base": base, "a": a}, {"a": {"x": 1}})
    c = out["comparisons"][0]
    d = np.array([a[s] - base[s] for s in (1, 2, 3)])
    ref = sps.ttest_rel([a[s] for s in (1, 2, 3)], [base[s] for s in (1, 2, 3)])
    lo, hi = sps.t.interval(0.95, 2, loc=d.mean(), scale=sps.sem(d))
    assert c["n"] == 3 and c["df"] == 2 and c["seeds"] == [1, 2, 3]
    assert c["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert c["ci95"] == pytest.approx([lo, hi], rel=1e-8)
    assert c["p_holm"] == pytest.approx(c["p"])  # a family of one
    assert out["noise_floor"]["base_seed_sd"] == pytest.approx(np.std(list(base.values()), ddof=1))
    assert out["multiple_comparisons"] == {"method": "Holm's step-down", "family_size": 1}


def test_holm_known_example():
    # sorted 0.01, 0.02, 0.03, 0.5 x (4, 3, 2, 1) = 0.04, 0.06, 0.06, 0.5; 0.9 x 1 stays capped
    assert holm([0.03, 0.01, 0.5, 0.02, None]) == pytest.approx([0.06, 0.04, 0.5, 0.06, None])
    assert holm([0.04, 0.3]) == pytest.approx([0.08, 0.3])
    # monotone: 0.3 x 2 = 0.6 exceeds the next step's 0.35 x 1, which is raised to 0.6
    assert holm([0.3, 0.35]) == pytest.approx([0.6, 0.6])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def grid_2x2(noise: float, seed: int = 0, seeds=SEEDS):
    """BPB = 1 - 0.02 [a high] + 0.01 [b high] + per-seed offset (+ noise): a main effect of
    -0.02 for a, +0.01 for b, no interaction."""
    rng = np.random.default_rng(seed)
    cells = {"base": (0, 0), "a": (1, 0), "b": (0, 1), "ab": (1, 1)}
    overlays = {"base": {}, "a": {"ttt": {"lr": 0.01}}, "b": {"model": {"gate": True}},
                "ab": {"ttt": {"lr": 0.01}, "model": {"gate": True}}}
    offset = {s: 0.003 * s for s in seeds}
    results = {v: {s: 1.0 - 0.02 * x + 0.01 * y + offset[s] + rng.normal(0, noise)
                   for s in seeds} for v, (x, y) in cells.items()}
    return results, overlays


def test_factorial_recovers_planted_effects():
    fac = factorial(*grid_2x2(0.0))
    assert fac["factors"] == ["model.gate", "ttt.lr"]
    effects = {e["effect"]: e for e in fac["effects"]}
    assert effects["ttt.lr"]["mean"] == pytest.approx(-0.02, abs=1e-12)
    assert effects["model.gate"]["mean"] == pytest.approx(0.01, abs=1e-12)
    assert effects["model.gate x ttt.lr"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert effects["ttt.lr"]["sd"] == pytest.approx(0.0, abs=1e-12)
    # per seed an effect is (sum of 4 cells, ±1) / 2: SD = noise, SE = noise / sqrt(16)
    noisy = {e["effect"]: e for e in factorial(*grid_2x2(0.001, seeds=range(16)))["effects"]}
    for name, true in (("ttt.lr", -0.02), ("model.gate", 0.01), ("model.gate x ttt.lr", 0.0)):
        assert abs(noisy[name]["mean"] - true) < 4 * noisy[name]["se"]
        assert 0.5 * 0.00025 < noisy[name]["se"] < 2 * 0.00025
    assert noisy["ttt.lr"]["p"] < 0.01


def test_not_factorial_gives_reason():
    results, overlays = grid_2x2(0.0)
    del results["ab"]
    assert factorial(results, overlays) == {
        "reason": "not a 2^k design: missing the combination with model.gate, ttt.lr high"}
    results, overlays = grid_2x2(0.0)
    results["a2"], overlays["a2"] = results["a"], {"ttt": {"lr": 0.02}}
    assert "factor ttt.lr has 3 levels" in factorial(results, overlays)["reason"]


def test_one_seed_does_not_crash(tmp_path):
    results = {v: {1: r[1]} for v, r in grid_2x2(0.0)[0].items()}
    out = variant_statistics(results, grid_2x2(0.0)[1])
    assert all("na" in c and c["n"] == 1 for c in out["comparisons"])
    assert out["multiple_comparisons"]["family_size"] == 0
    assert all("na" in e for e in out["factorial"]["effects"])
    text, overlays = suggest({"groups": [out]}, [{"x": 1}])
    assert "n/a" in text and list(overlays) == ["a+x=1"]


def write_grid(root, results, *, modes=("sliding",)):
    paths = []
    for v, per_seed in results.items():
        for s, bpb in per_seed.items():
            for i, m in enumerate(modes):
                p = root / "results/demo/variants" / v / f"seed{s}/eval/int6" / f"{m}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({"bpb": bpb - 0.001 * i}))
                paths.append(p)
    return paths


def test_writers_round_trip_paths(tmp_path):
    results, overlays = grid_2x2(0.001)
    paths = write_grid(tmp_path, results, modes=("ttt", "sliding"))
    assert parse_path(paths[0]) == ("base", 1, "int6", "ttt")
    stats = write_variant_statistics(paths, overlays, tmp_path / "v.json", tmp_path / "v.md",
                                     page=tmp_path / "v.html")
    assert [(g["policy"], g["mode"]) for g in stats["groups"]] == [("int6", "sliding"),
                                                                   ("int6", "ttt")]
    back = json.loads((tmp_path / "v.json").read_text())
    assert back["groups"][1]["variants"]["ab"]["values"] == {
        str(s): pytest.approx(results["ab"][s]) for s in SEEDS}
    md = (tmp_path / "v.md").read_text()
    assert "Holm's step-down" in md and "m = 3" in md and "model.gate x ttt.lr" in md
    page = (tmp_path / "v.html").read_text()
    assert page.count("<table>") == 4 and "<h2>int6 / ttt</h2>" in page
    with pytest.raises(ValueError, match="expected variants"):
        parse_path(tmp_path / "sliding.json")


def test_grid_suggest_prints_overlays_and_skips_tried(tmp_path, capsys):
    results, overlays = grid_2x2(0.001)
    del results["b"], results["ab"]
    stats = write_variant_statistics(write_grid(tmp_path, results), overlays,
                                     tmp_path / "variants.json", tmp_path / "v.md")
    assert stats["groups"][0]["comparisons"][0]["variant"] == "a"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(
        {"ttt.lr": [0.01, 0.02], "model.gate": [True], "eval.stride": [32]}))
    assert main(["grid", "suggest", "--results", str(tmp_path / "variants.json"),
                 "--candidates", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "best a " in out and "Holm's step-down, m = 1): significant at 0.05" in out
    assert "skipped ttt.lr=0.01: already in a" in out
    assert "# a+ttt.lr=0.02 replaces ttt.lr=0.01" in out
    printed = yaml.safe_load(out)
    assert printed == {"a+ttt.lr=0.02": {"ttt": {"lr": 0.02}},
                       "a+model.gate=true": {"ttt": {"lr": 0.01}, "model": {"gate": True}},
                       "a+eval.stride=32": {"ttt": {"lr": 0.01}, "eval": {"stride": 32}}}
    # a candidate already run on top of a is skipped as such; the base config's value too
    grown = {**results, "a2": {s: b - 0.001 for s, b in results["a"].items()}}
    text, more = suggest({"groups": [variant_statistics(
        grown, {**overlays, "a2": {"ttt": {"lr": 0.01}, "x": 1}})]},
        candidates_from([{"x": 1}, {"y": 2}, {"z": 3}]), base_config={"x": 0, "y": 2, "z": 0})
    assert "best a2 " in text and "skipped x=1: already in a2" in text
    assert "skipped y=2: the base config's value" in text
    assert more == {"a2+z=3": {"ttt": {"lr": 0.01}, "x": 1, "z": 3}}
    text, more = suggest({"groups": [variant_statistics(
        grown, {**overlays, "a2": {"ttt": {"lr": 0.01}, "x": 1}})]}, [{"z": 3}, {"x": 1}])
    assert "gain over a:" in text and "p x m, m = 2" in text
    with pytest.raises(ValueError, match="w = 1: not a key of the base config"):
        suggest({"groups": [variant_statistics(results, overlays)]}, [{"w": 1}],
                base_config={"x": 0})
    # "already run": a2 is x on top of a, so from a the candidate x=1 was tried
    text, more = suggest({"groups": [variant_statistics(
        {**results, "a2": results["a"]}, {**overlays, "a2": {"ttt": {"lr": 0.01}, "x": 1}})]},
        [{"x": 1}])
    assert "skipped x=1: already run as a2" in text and more == {}


def test_candidates_format_errors():
    assert candidates_from([{"ttt": {"lr": 0.01}}, {"a.b": 1}]) == [{"ttt.lr": 0.01}, {"a.b": 1}]
    with pytest.raises(ValueError, match="expected a list"):
        candidates_from(["ttt.lr"])
