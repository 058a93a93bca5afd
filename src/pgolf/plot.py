"""Figures for the report: a headless matplotlib axes whose PNG is written atomically."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pgolf.io import atomic_path


@contextmanager
def figure(out: Path, *, size: tuple[float, float], panels: int = 1) -> Iterator:
    """One axes, or a list of `panels` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size)
    try:
        yield axes if panels == 1 else list(axes)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
