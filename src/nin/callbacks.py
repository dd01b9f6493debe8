"""Trainer callbacks: progress bar, epoch lines, metric and rollback files, curve plots, checkpoints.

In a distributed run only the main process (rank 0) writes anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nin.atomic import write_error, write_text
from nin.checkpoint import CheckpointError, best_checkpoint, list_checkpoints, remove_stale, save_checkpoint, set_best
from nin.distributed import agree, is_main_process
from nin.errors import NinError
from nin.train import Callback, Trainer

METRIC_FIELDS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    "examples_per_sec", "epoch_time", "wall_time",
)


def format_metrics(m: dict[str, float], epochs: int) -> str:
    """One human-readable line for an epoch's metrics."""
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}", f"train acc {m['train_acc']:.4f}"]
    if "test_acc" in m:
        parts.append(f"test acc {m['test_acc']:.4f}")
    parts += [f"{m['examples_per_sec']:,.0f} ex/s", f"lr {m['lr']:.4g}", f"{m['wall_time']:.1f} s"]
    return "  ".join(parts)


def format_rollback(e: dict[str, float]) -> str:
    return (f"diverged: loss {e['loss']} at step {e['step']} (epoch {e['epoch']}); rolled back to step "
            f"{e['resumed_at_step']}, learning rate now x{e['lr_scale']:g}")


class ProgressBar(Callback):
    """A tqdm bar per epoch with ETA and the running loss, and one line per finished epoch."""

    # Showing the loss reads it on the host: every 10 steps on a CPU, every 50 on a GPU (as often as the
    # trainer's own finiteness check), so the GPU is not made to wait more often than that.
    def __init__(self, every: int | None = None, file=None, print_epochs: bool = True) -> None:
        self.every, self.file, self.print_epochs = every, file, print_epochs
        self.bar: tqdm | None = None

    def _open(self, trainer: Trainer) -> None:
        n = len(trainer.train_loader)
        self.bar = tqdm(total=n, initial=trainer.pos.batch, desc=f"epoch {trainer.epoch + 1}/{trainer.config.epochs}",
                        unit="batch", leave=False, file=self.file or sys.stderr, dynamic_ncols=True,
                        disable=None if is_main_process() else True)

    def on_step_end(self, trainer: Trainer, loss) -> None:
        if self.bar is None:
            self._open(trainer)
        self.bar.update(1)
        every = self.every or (10 if trainer.device.type == "cpu" else 50)
        if trainer.pos.batch % every == 0 and not self.bar.disable:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._close()
        if self.print_epochs and is_main_process():
            tqdm.write(format_metrics(metrics, trainer.config.epochs), file=self.file or sys.stdout)

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        self._close()  # the epoch starts again: a fresh bar

    def on_fit_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


class Checkpointer(Callback):
    """Checkpoints of a run: after each epoch, every ``every_steps`` steps, and where a run stops early.

    Keeps the newest ``keep_last`` (0: all) and, apart from them, the one with the best ``monitor``
    value (``checkpoints/best`` links to it). In a distributed run every process takes part in
    gathering the state, and only the main process writes; a failed write stops every process.
    """

    def __init__(self, run_dir: str | os.PathLike, meta: dict[str, Any], keep_last: int = 3,
                 every_steps: int | None = None, monitor: str = "test_acc", resumed_from: Path | None = None) -> None:
        if keep_last < 0:
            raise NinError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        if every_steps is not None and every_steps < 1:
            raise NinError(f"checkpoint interval must be at least 1 step, got {every_steps}")
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.keep_last, self.every_steps, self.monitor = keep_last, every_steps, monitor
        self.resumed_from = Path(resumed_from) if resumed_from is not None else None  # the checkpoint it went on from
        self.last_path: Path | None = None
        self.best_path: Path | None = None
        self.best_value = -math.inf

    def on_fit_start(self, trainer: Trainer) -> None:
        if is_main_process():
            remove_stale(self.run_dir)
        found = list_checkpoints(self.run_dir)
        self.last_path = found[-1] if found else None
        self.best_path = best_checkpoint(self.run_dir)
        if self.best_path is not None:  # the value it was chosen for, from the run's history
            step = int(self.best_path.name[5:])
            values = [h[self.monitor] for h in trainer.history if h.get("step") == step and self.monitor in h]
            self.best_value = values[0] if values else -math.inf

    def on_step_end(self, trainer: Trainer, loss) -> None:
        # The last step of an epoch is saved after its evaluation, by on_epoch_end.
        if (self.every_steps and trainer.step % self.every_steps == 0
                and trainer.pos.batch < len(trainer.train_loader)):
            self.save(trainer)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.save(trainer, metrics.get(self.monitor))

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.pos.batch:  # stopped inside an epoch: keep that position too
            self.save(trainer)

    def save(self, trainer: Trainer, value: float | None = None) -> Path | None:
        path = self.run_dir / "checkpoints" / f"step-{trainer.step:07d}"
        state = trainer.state_dict()  # every process: it gathers each one's RNG state

        def write() -> Path:
            if self.resumed_from is not None and path.resolve() == self.resumed_from.resolve():
                return path  # resumed and stopped again at once: this very state is saved already
            if os.path.lexists(path):
                raise CheckpointError(f"{path}: already exists, and is not the checkpoint this run went on from "
                                      "(was the run directory changed by another process?); it is kept as it is")
            saved = save_checkpoint(path, trainer.model, state, self.meta)
            if value is not None and value > self.best_value:
                self.best_value, self.best_path = value, saved
                set_best(self.run_dir, saved)
            if self.keep_last:  # prune all but the newest keep_last, sparing the best
                for old in list_checkpoints(self.run_dir)[:-self.keep_last]:
                    if old != self.best_path:
                        shutil.rmtree(old, ignore_errors=True)
            return saved

        self.last_path = agree(write, run_here=is_main_process()) or path
        return self.last_path
