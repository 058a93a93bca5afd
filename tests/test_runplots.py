"""Report figures of a run: byte groups add up, missing keys name their file, PNGs get written."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgolf.runplots import (
    CODE,
    CONTAINER,
    byte_components,
    looping_from,
    plot_allocation,
    plot_bytes,
    plot_loss_curves,
    read_metrics,
    seed_mean,
    tensor_type,
)

PNG = b"\x89PNG\r\n\x1a\n"
MATRICES = [f"blocks.{i}.{t}.weight" for i in range(2)
            for t in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")]


def write_metrics(path, *, steps: int, loop_at: int | None, offset: float = 0.0, drop=()):
    cols = {"step": list(range(1, steps + 1)),
            "loss": [7.0 - 3.0 * s / steps + offset for s in range(1, steps + 1)],
            "lr_mul": [min(1.0, s / 5) for s in range(1, steps + 1)],
            "tokens_per_s": [1000.0] * steps, "elapsed": [0.5 * s for s in range(1, steps + 1)],
            "looping": [loop_at is not None and s >= loop_at for s in range(1, steps + 1)]}
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), path)
    return path


def allocation(policy: str, bits: int) -> dict:
    names = [*MATRICES, "tok_emb.weight"]
    per = {n: {"bits": bits, "bytes": 1000 * bits, "dbpb": 1e-4 / bits} for n in names}
    return {"policy": policy, "bits": {n: bits for n in names},
            "clip_sigmas": {n: 12.85 for n in names},
            "predicted": {"bytes": sum(p["bytes"] for p in per.values()), "dbpb": 2e-3,
                          "dbpb_noise_se": 5e-4, "per_tensor": per}}


def artifact(policy: str, *, slack: int = 0) -> dict:
    breakdown = {n: {"codes": 100 * (i + 1), "scales": 10, "codec": "rans"}
                 for i, n in enumerate(MATRICES)}
    breakdown["tok_emb.weight"] = {"codes": 5000, "scales": 50, "codec": "rans+refs"}
    breakdown["fp16 group"] = {"bytes": 300, "tensors": 9, "codec": "rans"}
    breakdown["header"] = 57
    covered = sum(v.get("codes", 0) + v.get("scales", 0) + v.get("bytes", 0) if isinstance(v, dict)
                  else v for v in breakdown.values())
    size, code = covered + slack, 2000
    return {"policy": policy, "artifact_bytes": size, "code": {"bytes": code, "files": []},
            "total_bytes": size + code, "limit_bytes": 16_000_000,
            "margin_bytes": 16_000_000 - size - code, "breakdown": breakdown}


def dump(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_tensor_types_drop_layer_and_weight():
    assert tensor_type("blocks.11.attn.c_q.weight") == "attn.c_q"
    assert tensor_type("blocks.0.mlp.proj.weight") == "mlp.proj"
    assert tensor_type("tok_emb.weight") == "tok_emb"


def test_byte_components_group_by_type_and_sum_to_the_total():
    art = artifact("rd", slack=7)
    parts = byte_components(art)
    # both layers' c_q: codes 100 + 700 plus scales 10 + 10
    assert parts["attn.c_q"] == 820
    assert parts["mlp.proj"] == 600 + 1200 + 20
    assert parts["tok_emb"] == 5050
    assert parts["fp16 group"] == 300 and parts["header"] == 57
    assert parts[CONTAINER] == 7  # what the breakdown does not cover
    assert parts[CODE] == 2000
    assert sum(parts.values()) == art["total_bytes"]
    assert not any(k.startswith("blocks.") for k in parts)


def test_byte_components_leave_out_an_empty_container_share():
    assert CONTAINER not in byte_components(artifact("uniform"))


def test_byte_components_reject_inconsistent_totals():
    art = artifact("rd")
    art["total_bytes"] += 1
    with pytest.raises(ValueError, match="total_bytes"):
        byte_components(art, source="x.json")
    art = artifact("rd")
    art["artifact_bytes"] -= 1  # breakdown larger than the artifact
    with pytest.raises(ValueError, match="x.json.*more than"):
        byte_components(art, source="x.json")


def test_looping_start_and_seed_mean(tmp_path):
    m = read_metrics(write_metrics(tmp_path / "a.parquet", steps=20, loop_at=8))
    assert looping_from(m) == 8
    never = read_metrics(write_metrics(tmp_path / "b.parquet", steps=20, loop_at=None))
    assert looping_from(never) is None
    unlogged = read_metrics(write_metrics(tmp_path / "c.parquet", steps=10, loop_at=3,
                                          drop=("looping",)))
    assert looping_from(unlogged) is None
    short = read_metrics(write_metrics(tmp_path / "d.parquet", steps=10, loop_at=None,
                                       offset=1.0))
    steps, mean = seed_mean({1: m, 2: short})
    assert steps == list(range(1, 11))  # only the steps both seeds logged
    assert mean[0] == pytest.approx(m["loss"][0] + 0.5 + (3.0 / 20 - 3.0 / 10) / 2)


def test_loss_curves_png(tmp_path):
    paths = {1: write_metrics(tmp_path / "s1.parquet", steps=30, loop_at=10),
             2: write_metrics(tmp_path / "s2.parquet", steps=30, loop_at=12, offset=0.05)}
    out = tmp_path / "loss.png"
    plot_loss_curves(paths, out)
    assert out.read_bytes()[:8] == PNG
    # without the optional columns: one panel, still a figure
    lone = write_metrics(tmp_path / "s3.parquet", steps=5, loop_at=None,
                         drop=("lr_mul", "looping"))
    plot_loss_curves({3: lone}, tmp_path / "lone.png")
    assert (tmp_path / "lone.png").read_bytes()[:8] == PNG


def test_metrics_without_loss_name_the_file(tmp_path):
    bad = write_metrics(tmp_path / "bad.parquet", steps=5, loop_at=None, drop=("loss",))
    with pytest.raises(ValueError, match=r"bad\.parquet.*loss"):
        plot_loss_curves({1: bad}, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_allocation_and_bytes_png(tmp_path):
    allocs = {p: dump(tmp_path / f"alloc_{p}.json", allocation(p, b))
              for p, b in (("uniform", 6), ("rd", 5))}
    arts = {p: dump(tmp_path / f"art_{p}.json", artifact(p, slack=s))
            for p, s in (("uniform", 0), ("rd", 11))}
    plot_allocation(allocs, tmp_path / "alloc.png")
    plot_bytes(arts, tmp_path / "bytes.png")
    assert (tmp_path / "alloc.png").read_bytes()[:8] == PNG
    assert (tmp_path / "bytes.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("drop", ["bits", "predicted.per_tensor", "predicted.dbpb"])
def test_allocation_missing_key_names_the_file(tmp_path, drop):
    alloc = allocation("rd", 6)
    *parents, leaf = drop.split(".")
    node = alloc
    for key in parents:
        node = node[key]
    del node[leaf]
    bad = dump(tmp_path / "broken_alloc.json", alloc)
    good = dump(tmp_path / "good.json", allocation("uniform", 6))
    with pytest.raises(ValueError, match=rf"broken_alloc\.json.*{drop}"):
        plot_allocation({"uniform": good, "rd": bad}, tmp_path / "alloc.png")


@pytest.mark.parametrize("drop", ["breakdown", "total_bytes", "code", "limit_bytes"])
def test_artifact_missing_key_names_the_file(tmp_path, drop):
    art = artifact("rd")
    del art[drop]
    bad = dump(tmp_path / "broken_art.json", art)
    with pytest.raises(ValueError, match=rf"broken_art\.json.*{drop}"):
        plot_bytes({"rd": bad}, tmp_path / "bytes.png")
