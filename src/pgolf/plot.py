"""Figures for the report: a headless matplotlib axes whose PNG is written atomically."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pgolf.io import atomic_path


@contextmanager
def figure(out: Path, *, size: tuple[float, float]) -> Iterator:
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
