"""Loop contraction: passes found, Deltas checked by hand, a known contraction recovered."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pgolf.analysis.loops import LoopConfig, loop_rows, pass_starts, plot_loops
from pgolf.model.gpt import GPT, GPTConfig, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = LoopConfig(iterations=6, bootstrap=200)


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1,
                loop_start=1, loop_end=2, num_loops=2, skips=False)
    return GPTConfig(**{**base, **kw})


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A looping model whose blocks are not the identity (fresh init zeroes the projections)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.looping = True
    return model


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def of_kind(rows: list[dict], kind: str) -> list[dict]:
    return sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["pass"])


def test_pass_starts():
    cfg = tiny(num_loops=1)
    assert cfg.layer_sequence(True) == [0, 1, 2, 1, 2, 3]
    assert pass_starts(cfg, True) == [1, 3]
    three = GPTConfig(num_layers=5, loop_start=1, loop_end=3, num_loops=3)
    assert pass_starts(three, True) == [1, 4, 7, 10]
    assert pass_starts(GPTConfig(num_layers=3, loop_start=0, loop_end=0, num_loops=2),
                       True) == [0, 1, 2]
    with pytest.raises(ValueError, match="no looped layers: num_loops=0"):
        pass_starts(GPTConfig(num_layers=4), True)
    with pytest.raises(ValueError, match="looping=False"):
        pass_starts(cfg, False)


def test_models_without_loops_and_bad_settings_are_refused():
    idx = tokens(2, 8, 0)
    with pytest.raises(ValueError, match="no looped layers: num_loops=0"):
        loop_rows(randomized(tiny(num_loops=0)), [idx], cfg=SMALL, variant="float")
    model = randomized(tiny())
    model.looping = False
    with pytest.raises(ValueError, match="no looped layers"):
        loop_rows(model, [idx], cfg=SMALL, variant="float")
    with pytest.raises(ValueError, match="iterations"):
        LoopConfig(iterations=1)
    with pytest.raises(ValueError, match="at least one"):
        loop_rows(randomized(tiny()), [], cfg=SMALL, variant="float")


def by_hand_no_skips(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    b = model.blocks
    x0 = rms_norm(model.tok_emb(idx))
    h = [b[0](x0, x0)]
    for _ in range(3):  # sequence [0, 1, 2, 1, 2, 1, 2, 3]: three passes of blocks 1, 2
        h.append(b[2](b[1](h[-1], x0), x0))
    return h


def by_hand_with_skips(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    # encoder [0, 1, 2, 1] pushes e0..e3; decoder positions 4, 5, 6 pop e3, e2, e1 (LIFO)
    b, w = model.blocks, model.skip_weights
    x0 = rms_norm(model.tok_emb(idx))
    e0 = b[0](x0, x0)
    e1 = b[1](e0, x0)
    e2 = b[2](e1, x0)
    e3 = b[1](e2, x0)
    h2 = b[2](e3 + w[0] * e3, x0)
    h3 = b[2](b[1](h2 + w[1] * e2, x0) + w[2] * e1, x0)
    return [e0, e2, h2, h3]


@pytest.mark.parametrize(("skips", "by_hand"), [(False, by_hand_no_skips),
                                                (True, by_hand_with_skips)])
def test_network_deltas_match_a_direct_computation(skips, by_hand):
    model = randomized(tiny(skips=skips), seed=1)
    batches = [tokens(3, 16, 2), tokens(3, 16, 3)]
    rows = of_kind(loop_rows(model, batches, cfg=SMALL, variant="float"), "network")
    with torch.no_grad():
        h = [t.double() for t in by_hand(model, torch.cat(batches))]
    assert [r["pass"] for r in rows] == [1, 2, 3] and rows[0]["windows"] == 6
    for k, row in enumerate(rows, start=1):
        per_window = (h[k] - h[k - 1]).norm(dim=-1).mean(dim=-1)
        assert row["delta"] == pytest.approx(float(per_window.mean()), rel=1e-5)
        se = float(per_window.std() / math.sqrt(6))
        assert row["delta_se"] == pytest.approx(se, rel=1e-4)
        base = float(h[k - 1].norm(dim=-1).mean())
        assert row["rel_delta"] == pytest.approx(row["delta"] / base, rel=1e-5)
    assert math.isnan(rows[0]["ratio"])
    ratios = [rows[1]["delta"] / rows[0]["delta"], rows[2]["delta"] / rows[1]["delta"]]
    assert [r["ratio"] for r in rows[1:]] == pytest.approx(ratios)
    geo = math.sqrt(ratios[0] * ratios[1])
    assert all(r["geo_mean_ratio"] == pytest.approx(geo) for r in rows)
    assert rows[0]["predicted_next"] == pytest.approx(geo ** 3)


def test_pure_iteration_without_skips_repeats_the_network():
    model = randomized(tiny(), seed=4)  # no skips: the network's 3 passes are pure iteration
    rows = loop_rows(model, [tokens(4, 12, 5)], cfg=LoopConfig(iterations=3, bootstrap=50),
                     variant="float")
    network, pure = of_kind(rows, "network"), of_kind(rows, "pure")
    assert [r["delta"] for r in pure] == pytest.approx([r["delta"] for r in network], rel=1e-6)
    skipped = of_kind(loop_rows(randomized(tiny(skips=True), seed=4), [tokens(4, 12, 5)],
                                cfg=LoopConfig(iterations=3, bootstrap=50), variant="float"),
                      "network")
    assert skipped[-1]["delta"] != pytest.approx(network[-1]["delta"], rel=1e-3)


class Contract(nn.Module):
    """x -> x + a (x0 - x): each application shrinks the distance to x0 by the factor 1 - a."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask=None) -> torch.Tensor:
        return x + self.a * (x0 - x)


def test_pure_iteration_recovers_a_known_contraction():
    model = randomized(tiny(skips=True), seed=6).double()
    model.blocks[1], model.blocks[2] = Contract(0.3), Contract(0.5)
    rows = loop_rows(model, [tokens(4, 10, 7)], cfg=SMALL, variant="toy")
    pure = of_kind(rows, "pure")
    # one pass maps x - x0 to (1 - 0.3)(1 - 0.5)(x - x0), so every Delta ratio is exactly 0.35
    r = 0.7 * 0.5
    assert len(pure) == 6 and all(row["variant"] == "toy" for row in pure)
    assert [row["ratio"] for row in pure[1:]] == pytest.approx([r] * 5, abs=1e-9)
    assert pure[0]["geo_mean_ratio"] == pytest.approx(r, abs=1e-6)
    assert pure[0]["predicted_next"] == pytest.approx(r ** 6, rel=1e-6)
    assert pure[-1]["delta"] / pure[0]["delta"] == pytest.approx(r ** 5, rel=1e-6)
    assert pure[0]["ratio_lo"] != pure[0]["ratio_lo"]  # NaN on pass 1
    assert pure[1]["ratio_lo"] == pytest.approx(r) and pure[1]["ratio_hi"] == pytest.approx(r)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_windows():
    model = randomized(tiny(), seed=8)

    def widths(windows: int) -> np.ndarray:
        rows = loop_rows(model, [tokens(windows, 8, windows)], cfg=SMALL, variant="float")
        for row in rows:
            assert row["delta_lo"] <= row["delta"] <= row["delta_hi"]
            if row["pass"] > 1:
                assert row["ratio_lo"] <= row["ratio"] <= row["ratio_hi"]
            assert row["geo_mean_lo"] <= row["geo_mean_ratio"] <= row["geo_mean_hi"]
        return np.array([r["delta_hi"] - r["delta_lo"] for r in rows])

    few, many = widths(8), widths(128)  # 16x the windows: about 4x narrower
    assert np.all(few > 0) and np.all(many < few / 2)


def test_identical_windows_give_zero_width_intervals_and_fixed_seed_repeats():
    model = randomized(tiny(), seed=9)
    same = tokens(1, 12, 10).repeat(5, 1)
    rows = loop_rows(model, [same], cfg=SMALL, variant="float")
    for row in rows:
        assert row["delta_se"] == pytest.approx(0, abs=1e-12)
        assert row["delta_lo"] == pytest.approx(row["delta"], rel=1e-12)
        assert row["delta_hi"] == pytest.approx(row["delta"], rel=1e-12)
        if row["pass"] > 1:
            assert row["ratio_hi"] - row["ratio_lo"] == pytest.approx(0, abs=1e-12)
    batch = [tokens(6, 8, 11)]
    first = loop_rows(model, batch, cfg=SMALL, variant="float")
    again = loop_rows(model, batch, cfg=SMALL, variant="float")
    assert [r["delta_lo"] for r in again] == [r["delta_lo"] for r in first]
    assert [r["ratio_hi"] for r in again if r["pass"] > 1] == [
        r["ratio_hi"] for r in first if r["pass"] > 1]
    other = loop_rows(model, batch, cfg=LoopConfig(bootstrap=200, seed=1), variant="float")
    assert [r["delta_lo"] for r in other] != [r["delta_lo"] for r in first]


def test_plot_writes_a_png(tmp_path):
    model = randomized(tiny(), seed=12)
    rows = loop_rows(model, [tokens(4, 8, 13)], cfg=SMALL, variant="float")
    rows += loop_rows(model, [tokens(4, 8, 14)], cfg=SMALL, variant="int6")
    out = tmp_path / "sub" / "loops.png"
    plot_loops(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_loops([], tmp_path / "empty.png")
