"""Report figures of a run: training loss curves, bit allocations and the artifact's byte breakdown."""  # noqa: E501

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from pgolf.io import read_json, require_file
from pgolf.plot import figure

# The tensor type a matrix belongs to: its name without the layer prefix and the ".weight" suffix,
# so every layer's attn.c_q lands in one group and the byte bars stay readable at any depth.
_LAYER = re.compile(r"^blocks\.\d+\.")
_WEIGHT = re.compile(r"\.weight$")
CONTAINER, CODE = "container/other", "code"


def _require(path: Path, obj, *keys: str) -> None:
    """Raise a ValueError naming `path` for the first dotted key `obj` lacks."""
    for key in keys:
        node = obj
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path}: missing key {key!r}")
            node = node[part]


@contextmanager
def _stacked(out: Path, *, size: tuple[float, float], panels: int) -> Iterator[list]:
    """`panels` axes stacked on a shared x axis, in pgolf.plot.figure's headless, atomic figure
    (built here so as not to depend on figure() growing a layout option)."""
    with figure(Path(out), size=size) as ax:
        if panels == 1:
            yield [ax]
            return
        fig = ax.figure
        ax.remove()
        yield list(fig.subplots(panels, 1, sharex=True))


def _short(name: str) -> str:
    return _WEIGHT.sub("", name)


def tensor_type(name: str) -> str:
    """'blocks.3.attn.c_q.weight' -> 'attn.c_q'; 'tok_emb.weight' -> 'tok_emb'."""
    return _LAYER.sub("", _short(name))


# --- loss curves -------------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[str, list]:
    """The columns of a training metrics table the figure uses (step and loss required)."""
    path = require_file(path, "training metrics")
    names = pq.read_schema(path).names
    missing = [c for c in ("step", "loss") if c not in names]
    if missing:
        raise ValueError(f"{path}: metrics lack column(s) {', '.join(missing)}")
    wanted = [c for c in ("step", "loss", "lr_mul", "looping") if c in names]
    return pq.read_table(path, columns=wanted).to_pydict()


def looping_from(metrics: dict[str, list]) -> int | None:
    """The first step trained with looping on; None if it never switched on or is not logged."""
    if "looping" not in metrics:
        return None
    return next((s for s, on in zip(metrics["step"], metrics["looping"], strict=True) if on), None)


def seed_mean(curves: dict[int, dict[str, list]]) -> tuple[list[int], list[float]]:
    """Per-step mean loss over seeds, on the steps every seed logged (a stopped run has fewer)."""
    by_step = [dict(zip(c["step"], c["loss"], strict=True)) for c in curves.values()]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    return steps, [sum(d[s] for d in by_step) / len(by_step) for s in steps]


def plot_loss_curves(metrics: dict[int, Path], out: Path) -> None:
    """Training loss vs step for every seed (top) and the LR multiplier (bottom, if logged)."""
    if not metrics:
        raise ValueError("plot_loss_curves needs at least one seed's metrics")
    curves = {seed: read_metrics(Path(p)) for seed, p in metrics.items()}
    with_lr = all("lr_mul" in c for c in curves.values())
    with _stacked(out, size=(9, 6.5 if with_lr else 4.5), panels=2 if with_lr else 1) as axes:
        # Per-step loss is one batch's loss: read the last steps' mean, not the last point.
        for seed, c in curves.items():
            tail = c["loss"][-max(1, len(c["loss"]) // 10):]
            axes[0].plot(c["step"], c["loss"], lw=1, alpha=0.8,
                         label=f"seed {seed} (mean of last {len(tail)} steps "
                               f"{sum(tail) / len(tail):.3f})")
            if with_lr:
                axes[1].plot(c["step"], c["lr_mul"], lw=1, alpha=0.8)
        if len(curves) >= 2:
            axes[0].plot(*seed_mean(curves), color="black", lw=0.8, alpha=0.4,
                         label=f"mean over {len(curves)} seeds")
        _mark_looping(axes, curves)
        axes[0].set(ylabel="training loss (nats/token)",
                    title="Training loss per step; the seed-to-seed spread is the noise floor")
        axes[0].legend(fontsize=8)
        if with_lr:
            axes[1].set(ylabel="LR multiplier")
        axes[-1].set(xlabel="step")


def _mark_looping(axes: list, curves: dict[int, dict[str, list]]) -> None:
    """A dashed line where looping switched on: one if every seed agrees, else one per seed."""
    starts = {seed: looping_from(c) for seed, c in curves.items()}
    steps = sorted({s for s in starts.values() if s is not None})
    for step in steps:
        who = "" if len(steps) == 1 else " (seed " + ", ".join(
            str(k) for k, s in starts.items() if s == step) + ")"
        for i, ax in enumerate(axes):
            ax.axvline(step, color="#555555", ls="--", lw=0.8,
                       label=f"looping on from step {step}{who}" if i == 0 else None)


# --- bit allocations ---------------------------------------------------------------------------


def read_allocation(path: Path) -> dict:
    path = Path(path)
    alloc = read_json(require_file(path, "allocation"))
    _require(path, alloc, "bits", "predicted.dbpb", "predicted.bytes", "predicted.per_tensor")
    return alloc


def plot_allocation(allocations: dict[str, Path], out: Path) -> None:
    """Bits per quantizable tensor per policy (top) and the sweep's predicted dBPB (bottom)."""
    if not allocations:
        raise ValueError("plot_allocation needs at least one policy's allocation")
    allocs = {policy: read_allocation(p) for policy, p in allocations.items()}
    names = list(dict.fromkeys(n for a in allocs.values() for n in a["bits"]))
    x = range(len(names))
    width = 0.8 / len(allocs)
    with _stacked(out, size=(max(8.0, 0.4 * len(names)), 7.5), panels=2) as (top, bottom):
        for i, (policy, alloc) in enumerate(allocs.items()):
            # Offset each policy a little so equal bit widths do not hide each other.
            shift = (i - (len(allocs) - 1) / 2) * width
            per = alloc["predicted"]["per_tensor"]
            top.plot([j + shift / 2 for j, n in enumerate(names) if n in alloc["bits"]],
                     [alloc["bits"][n] for n in names if n in alloc["bits"]],
                     "o", color=f"C{i}", label=policy)
            bottom.bar([j + shift for j in x], [per.get(n, {}).get("dbpb", 0.0) for n in names],
                       width=width, color=f"C{i}", label=policy)
        bits = [b for a in allocs.values() for b in a["bits"].values()]
        top.set_yticks(range(min(bits), max(bits) + 1))
        top.set(ylabel="bits", title=_allocation_title(allocs))
        top.grid(axis="y", alpha=0.3)
        top.legend(fontsize=8)
        bottom.set(ylabel="predicted dBPB (sweep)")
        bottom.set_xticks(list(x), [_short(n) for n in names], rotation=90, fontsize=8)
        bottom.legend(fontsize=8)


def _allocation_title(allocs: dict[str, dict]) -> str:
    parts = []
    for policy, alloc in allocs.items():
        pred = alloc["predicted"]
        se = pred.get("dbpb_noise_se")
        noise = f" ± {se:.5f} (noise SE)" if se is not None else ""
        parts.append(f"{policy}: dBPB {pred['dbpb']:.5f}{noise}, {pred['bytes']:,} B")
    return "Bit allocation per tensor, predicted by the sensitivity sweep\n" + "\n".join(parts)


# --- artifact bytes ----------------------------------------------------------------------------


def byte_components(artifact: dict, *, source: str = "artifact") -> dict[str, int]:
    """Bytes of a submission by component: codes + scales per tensor type, each other breakdown
    entry under its own name (fp16 group, header), LQER corrections together as 'LQER', what the
    breakdown does not cover as 'container/other', and the code. The values sum to
    `total_bytes` exactly."""
    parts: dict[str, int] = {}
    for name, entry in artifact["breakdown"].items():
        if isinstance(entry, dict) and entry.get("lqer"):
            parts["LQER"] = parts.get("LQER", 0) + entry["lqer"]
        if isinstance(entry, dict) and ("codes" in entry or "scales" in entry):
            key, size = tensor_type(name), entry.get("codes", 0) + entry.get("scales", 0)
        elif isinstance(entry, dict):
            key, size = name, entry.get("bytes", 0)
        else:
            key, size = name, int(entry)
        parts[key] = parts.get(key, 0) + size
    rest = artifact["artifact_bytes"] - sum(parts.values())
    if rest < 0:
        raise ValueError(f"{source}: breakdown sums to {sum(parts.values()):,} B, more than "
                         f"artifact_bytes {artifact['artifact_bytes']:,}")
    if rest:
        parts[CONTAINER] = rest
    parts[CODE] = artifact["code"]["bytes"]
    if artifact["artifact_bytes"] + parts[CODE] != artifact["total_bytes"]:
        raise ValueError(f"{source}: artifact_bytes {artifact['artifact_bytes']:,} + code "
                         f"{parts[CODE]:,} != total_bytes {artifact['total_bytes']:,}")
    assert sum(parts.values()) == artifact["total_bytes"]  # the bars must add up to the total
    return parts


def read_artifact(path: Path) -> dict:
    path = Path(path)
    artifact = read_json(require_file(path, "artifact summary"))
    _require(path, artifact, "artifact_bytes", "code.bytes", "total_bytes", "limit_bytes",
             "breakdown")
    return artifact


def plot_bytes(artifacts: dict[str, Path], out: Path) -> None:
    """One horizontal bar per policy, stacked by byte component, with the margin to the limit."""
    if not artifacts:
        raise ValueError("plot_bytes needs at least one policy's artifact")
    summaries = {policy: read_artifact(p) for policy, p in artifacts.items()}
    parts = {policy: byte_components(a, source=str(artifacts[policy]))
             for policy, a in summaries.items()}
    keys = list(dict.fromkeys(k for p in parts.values() for k in p))
    with figure(Path(out), size=(11, 2.2 + 0.7 * len(parts))) as ax:
        import matplotlib  # loaded (headless) by figure()

        # tab20: the ten-colour cycle would repeat with ten tensor types plus header and code.
        colors = {k: matplotlib.colormaps["tab20"](i % 20) for i, k in enumerate(keys)}
        for y, (policy, comp) in enumerate(parts.items()):
            left = 0
            for key in keys:
                size = comp.get(key, 0)
                ax.barh(y, size, left=left, color=colors[key], edgecolor="white", lw=0.5,
                        hatch="//" if key == CODE else None, label=key if y == 0 else None)
                if size > 0.06 * summaries[policy]["total_bytes"]:  # only labels that fit
                    ax.text(left + size / 2, y, f"{size / 1000:.0f}k", ha="center",
                            va="center", fontsize=7)
                left += size
        _mark_limit(ax, summaries)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:,.0f}k")
        ax.set_yticks(range(len(parts)), [_bar_label(p, a) for p, a in summaries.items()],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="bytes (codes + scales per tensor type; code = counted source)",
               title="Submission bytes by component")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _bar_label(policy: str, artifact: dict) -> str:
    """Total and margin beside each bar: a limit line far to the right would squash the bars."""
    margin = artifact["limit_bytes"] - artifact["total_bytes"]
    return (f"{policy}\n{artifact['total_bytes']:,} B\nmargin {margin:,} B\n"
            f"({margin / artifact['limit_bytes']:.1%} of {artifact['limit_bytes']:,})")


def _mark_limit(ax, summaries: dict[str, dict]) -> None:
    """The limit as a line only when it is near the bars (within 2x of the largest total)."""
    limit = max(a["limit_bytes"] for a in summaries.values())
    biggest = max(a["total_bytes"] for a in summaries.values())
    if biggest >= 0.5 * limit:
        ax.axvline(limit, color="#c44e52", lw=1.5, label=f"limit {limit:,} B")
        ax.set_xlim(0, 1.03 * max(limit, biggest))
    else:
        ax.set_xlim(0, 1.03 * biggest)
