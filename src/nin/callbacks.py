"""Trainer callbacks: progress bar, epoch lines, metric and rollback files, curve plots, checkpoints.

In a distributed run only the main process (rank 0) writes anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from nin.checkpoint import list_checkpoints, save_checkpoint
from nin.plots import plot_curves
from nin.train import Callback, Trainer

METRIC_FIELDS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    "examples_per_sec", "epoch_time", "wall_time",
)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsWriter(Callback):
    """``metrics.csv`` and ``metrics.jsonl`` in the run directory, rewritten from the history each epoch."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not is_main_process():
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(trainer.history)
        _write_atomic(self.run_dir / "metrics.csv", buf.getvalue())
        _write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in trainer.history))


class RollbackLog(Callback):
    """Each rollback (``--on-diverge rollback``): a line on stderr, even with --quiet, and ``rollbacks.jsonl``."""

    def __init__(self, run_dir: str | os.PathLike, file=None) -> None:
        self.run_dir, self.file = Path(run_dir), file

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        if not is_main_process():
            return
        tqdm.write(format_rollback(event), file=self.file or sys.stderr)
        _write_atomic(self.run_dir / "rollbacks.jsonl", "".join(json.dumps(e) + "\n" for e in trainer.rollbacks))


class CurvePlotter(Callback):
    """``curves.png``: loss and accuracies against epoch, redrawn after each epoch."""

    def __init__(self, run_dir: str | os.PathLike, title: str = "") -> None:
        self.run_dir, self.title = Path(run_dir), title

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if is_main_process():
            plot_curves(trainer.history, self.run_dir / "curves.png", self.title)


class Checkpointer(Callback):
    """A checkpoint after each epoch (and where a run stops early), keeping the last ``keep_last``."""

    def __init__(self, run_dir: str | os.PathLike, meta: dict[str, Any], keep_last: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.keep_last = keep_last
        self.last_path: Path | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        found = list_checkpoints(self.run_dir)
        self.last_path = found[-1] if found else None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.pos.batch:  # stopped inside an epoch: keep that position too
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path | None:
        if not is_main_process():
            return None
        path = self.run_dir / "checkpoints" / f"step-{trainer.step:07d}"
        if path.exists():  # already saved at this step (e.g. resumed and stopped again at once)
            self.last_path = path
            return path
        self.last_path = save_checkpoint(path, trainer.model, trainer.state_dict(), self.meta)
        for old in list_checkpoints(self.run_dir)[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return self.last_path
