"""A run's record: metrics.csv and metrics.jsonl, rollbacks.jsonl, curves.png."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from nin.atomic import write_error, write_text
from nin.training.callbacks.base import Callback
from nin.training.callbacks.progress import format_rollback
from nin.training.distributed import agree, is_main_process

METRIC_FIELDS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    "examples_per_sec", "epoch_time", "wall_time",
)

if TYPE_CHECKING:
    from nin.training.trainer import Trainer


class MetricsWriter(Callback):
    """``metrics.csv`` and ``metrics.jsonl`` in the run directory, rewritten from the history each epoch."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        agree(lambda: self.write(trainer.history), run_here=is_main_process())

    def write(self, history: list[dict[str, float]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(history)
        write_text(self.run_dir / "metrics.csv", buf.getvalue())
        write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


class RollbackLog(Callback):
    """Each rollback (``--on-diverge rollback``): a line on stderr, even with --quiet, and ``rollbacks.jsonl``."""

    def __init__(self, run_dir: str | os.PathLike, file=None) -> None:
        self.run_dir, self.file = Path(run_dir), file

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        def write() -> None:
            tqdm.write(format_rollback(event), file=self.file or sys.stderr)
            write_text(self.run_dir / "rollbacks.jsonl", "".join(json.dumps(e) + "\n" for e in trainer.rollbacks))

        agree(write, run_here=is_main_process())


class CurvePlotter(Callback):
    """``curves.png``: loss and accuracies against epoch, redrawn after each epoch."""

    def __init__(self, run_dir: str | os.PathLike, title: str = "") -> None:
        self.run_dir, self.title = Path(run_dir), title

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        agree(lambda: self.plot(trainer.history), run_here=is_main_process())

    def plot(self, history: list[dict[str, float]]) -> None:
        from nin.plots import plot_curves  # matplotlib: imported when the first figure is drawn

        path = self.run_dir / "curves.png"
        try:
            plot_curves(history, path, self.title)
        except OSError as e:
            raise write_error(path, e) from None
