"""Figures, each drawn inside its own style context so that a style set by one library (Optuna's
matplotlib plots switch to ggplot) never leaks into the next: ``with figure_style() as plt:``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tune_pets.utils import atomic_path


@contextlib.contextmanager
def figure_style() -> Iterator:
    """Matplotlib (Agg) with its default style, restored afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), plt.style.context("default"):
        yield plt


def save(fig, path: Path, dpi: int = 110, **kwargs) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name's suffix is .tmp: name the format
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, **kwargs)
    plt.close(fig)


def confusion_figure(cm: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix (each row: the recall of its class); counts go to CSV."""
    with figure_style() as plt:
        n = len(classes)
        side = max(6.0, 0.28 * n + 2)
        fig, ax = plt.subplots(figsize=(side + 1.2, side))
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
        caption = "Colours: each row normalised to sum to 1 (recall per class); counts in the CSV."
        fig.text(0.01, 0.005, caption, fontsize=8)
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        save(fig, path)
