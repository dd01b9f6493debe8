"""Figures: learning curves and confusion matrices, written as PNG files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nin.atomic import atomic_path  # noqa: E402


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Train loss, train accuracy and test accuracy against epoch, on one set of axes."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "--", label="train acc")
    if history and "test_acc" in history[0]:
        ax.plot(epochs, [h["test_acc"] for h in history], "-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max(epochs, default=1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A row-normalized confusion matrix with the counts written in each cell."""
    m = matrix.double()
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.55 * k), dpi=120)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | os.PathLike, *, exclusive: bool = False) -> Path:
    """Save whole or not at all (:mod:`nin.atomic`): a crash or a full disk never leaves half a PNG.
    ``exclusive``: never over an existing file (:class:`~nin.atomic.OutputExists`)."""
    try:
        with atomic_path(path, exclusive=exclusive) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
