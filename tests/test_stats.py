"""Seed statistics: paired t with df = n - 1, exact p and t intervals, checked against scipy."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pgolf.eval.seeds import html_page, markdown, seed_statistics
from pgolf.eval.stats import incomplete_beta, paired, spread, t_quantile, t_sf2


def test_the_1818_gaps_give_t_221_not_131():
    # #1818's per-seed post-quantization gaps: its README divided the mean by the SD (t = 131)
    gaps = [2.37415, 2.34001, 2.36922]
    result = paired(gaps, [0.0, 0.0, 0.0])
    assert result["n"] == 3 and result["df"] == 2
    assert result["t"] == pytest.approx(221.6, abs=0.1)
    assert result["mean"] / result["sd"] == pytest.approx(127.9, abs=0.1)  # the seed's mistake
    assert result["se"] == pytest.approx(result["sd"] / math.sqrt(3))
    assert result["p"] == pytest.approx(scipy_stats.ttest_1samp(gaps, 0).pvalue, rel=1e-9)


@pytest.mark.parametrize("seed", range(25))
def test_paired_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    a = rng.normal(0, 1, n)
    b = a - rng.normal(rng.normal(0, 0.5), rng.uniform(0.01, 2), n)
    ours = paired(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    assert ours["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    low, high = ref.confidence_interval(0.95)
    assert ours["ci95"] == pytest.approx([low, high], rel=1e-8)
    assert ours["sd"] == pytest.approx(np.std(a - b, ddof=1))


@pytest.mark.parametrize("df", [1, 2, 3, 7.5, 30, 400])
def test_distribution_functions_match_scipy(df):
    for t in (0.0, 0.3, 1.0, 2.5, 8.0, 60.0):
        assert t_sf2(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    for q in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)
    for x in (1e-6, 0.2, 0.5, 0.93):
        assert incomplete_beta(x, df / 2, 0.5) == pytest.approx(
            scipy_stats.beta.cdf(x, df / 2, 0.5), rel=1e-9)


def test_edge_cases():
    with pytest.raises(ValueError, match="at least 2 paired values"):
        paired([1.0], [0.0])
    constant = paired([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert constant["t"] == math.inf and constant["p"] == 0.0
    assert math.isnan(paired([1.0, 1.0], [1.0, 1.0])["t"])
    assert spread([1.0, 2.0, 3.0]) == {"n": 3, "mean": 2.0, "sd": 1.0}
    assert math.isnan(spread([1.0])["sd"])


def eval_result(bpb, nll, tokens=(100, 100, 50), bytes_=500):
    chunks = {"nll_nats": list(nll), "tokens": list(tokens), "bytes": [200, 200, 100]}
    return {"mode": "m", "bpb": bpb, "bytes": bytes_, "chunks": chunks}


def fake_run(seeds, rng):
    """Eval and artifact JSONs of two policies over `seeds`, the BPB consistent with the sums."""
    evals, artifacts = {}, {}
    for s in seeds:
        for p in ("uniform", "rd"):
            artifacts[s, p] = {"artifact_bytes": 1000 + s, "total_bytes": 1500 + s,
                               "margin_bytes": 10 ** 6 - s}
            for mode in ("prequant", "roundtrip", "sliding", "ttt"):
                nll = rng.uniform(300, 400, 3)
                evals[s, p, mode] = eval_result(nll.sum() / math.log(2) / 500, nll)
    return evals, artifacts


def test_seed_statistics_are_the_paired_statistics_of_the_eval_results():
    evals, artifacts = fake_run([1, 2, 3], np.random.default_rng(0))
    stats = seed_statistics(evals, artifacts, seeds=[1, 2, 3], policies=["uniform", "rd"],
                            modes=["ttt", "prequant", "sliding", "roundtrip"])
    assert stats["modes"] == ["prequant", "roundtrip", "sliding", "ttt"]  # pipeline order
    pairs = [(d["from"], d["to"]) for d in stats["paired_modes"]["rd"]]
    assert pairs == [("prequant", "roundtrip"), ("roundtrip", "sliding"), ("sliding", "ttt"),
                     ("prequant", "ttt")]
    first = stats["paired_modes"]["rd"][0]
    expected = paired([evals[s, "rd", "roundtrip"]["bpb"] for s in (1, 2, 3)],
                      [evals[s, "rd", "prequant"]["bpb"] for s in (1, 2, 3)])
    assert first["t"] == pytest.approx(expected["t"]) and first["df"] == 2
    policy = stats["paired_policies"][0]
    assert (policy["mode"], policy["from"], policy["to"]) == ("prequant", "uniform", "rd")
    spread_ttt = stats["across_seeds"]["uniform"]["ttt"]
    assert spread_ttt["sd"] == pytest.approx(np.std([evals[s, "uniform", "ttt"]["bpb"]
                                                     for s in (1, 2, 3)], ddof=1))
    pairs = {(r["from"], r["to"]) for r in stats["within_runs"]}
    assert pairs == {("prequant", "roundtrip"), ("sliding", "ttt")}
    for row in stats["within_runs"]:  # chunk differences sum to the BPB difference
        s, p, a, b = row["seed"], row["policy"], row["from"], row["to"]
        assert row["dbpb"] == pytest.approx(evals[s, p, b]["bpb"] - evals[s, p, a]["bpb"],
                                            rel=1e-12)
        assert row["se"] > 0 and row["chunks"] == 3
    table = markdown(stats)
    assert "| 3 | rd |" in table and "n = 3, df = 2" in table
    page = html_page(table)  # the report's copy: every Markdown table row, as HTML
    rows = [line for line in table.splitlines() if line.startswith("|") and "---" not in line]
    assert page.count("<tr>") == len(rows) and page.count("<table>") == 3
    assert "<td>3</td><td>rd</td>" in page and "mean ± SD" in page
    assert "&lt;b&gt;" in html_page("# x\n\n<b> is text")


def test_phased_ttt_follows_ttt_and_pairs_with_sliding_over_chunks():
    evals, artifacts = fake_run([1, 2], np.random.default_rng(1))
    for (s, p, mode), result in list(evals.items()):
        if mode == "ttt":
            evals[s, p, "phased_ttt"] = {**result, "bpb": result["bpb"] - 0.01}
    stats = seed_statistics(evals, artifacts, seeds=[1, 2], policies=["uniform", "rd"],
                            modes=["phased_ttt", "sliding", "ttt"])
    assert stats["modes"] == ["sliding", "ttt", "phased_ttt"]
    pairs = {(r["from"], r["to"]) for r in stats["within_runs"]}
    assert pairs == {("sliding", "ttt"), ("sliding", "phased_ttt")}


def test_one_seed_has_no_paired_statistics_and_strict_json():
    evals, artifacts = fake_run([7], np.random.default_rng(1))
    stats = seed_statistics(evals, artifacts, seeds=[7], policies=["uniform", "rd"],
                            modes=["prequant", "roundtrip"])
    assert stats["paired_modes"] == {} and stats["paired_policies"] == []
    assert stats["across_seeds"]["rd"]["prequant"]["sd"] is None  # NaN is not JSON
    json.dumps(stats, allow_nan=False)
    assert "n/a" in markdown(stats)
