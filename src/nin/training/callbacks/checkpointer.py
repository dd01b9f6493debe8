"""Trainer callbacks: progress bar, epoch lines, metric and rollback files, curve plots, checkpoints.

In a distributed run only the main process (rank 0) writes anything.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nin.errors import NinError
from nin.training.callbacks.base import Callback
from nin.training.checkpoint import (
    CheckpointError,
    best_checkpoint,
    list_checkpoints,
    remove_stale,
    save_checkpoint,
    set_best,
)
from nin.training.distributed import agree, is_main_process

if TYPE_CHECKING:
    from nin.training.trainer import Trainer


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
        self.best_step: int | None = None  # the step of the best checkpoint
        self._restored: dict[str, Any] | None = None  # the state a resumed run gave back (load_state_dict)

    def on_fit_start(self, trainer: Trainer) -> None:
        if is_main_process():
            remove_stale(self.run_dir)
        found = list_checkpoints(self.run_dir)
        self.last_path = found[-1] if found else None
        self.best_path = best_checkpoint(self.run_dir)
        if self.best_path is not None and self._restored is None:
            # A checkpoint from before callbacks kept their state: the value the best one was chosen for is the
            # monitored value of the epoch that ended at its step.
            step = int(self.best_path.name[5:])
            values = [h[self.monitor] for h in trainer.history if h.get("step") == step and self.monitor in h]
            self.best_value = values[0] if values else -math.inf

    def state_dict(self) -> dict[str, Any]:
        """The best monitored value so far and the step of its checkpoint (None: none yet)."""
        best = self.best_value if math.isfinite(self.best_value) else None
        return {"monitor": self.monitor, "best_value": best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") != self.monitor:
            return  # chosen by another measure: start afresh
        value = state.get("best_value")
        self.best_value = float(value) if isinstance(value, (int, float)) else -math.inf
        step = state.get("best_step")
        self.best_step = step if isinstance(step, int) else None
        self._restored = state

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
        improved = value is not None and value > self.best_value
        if improved:  # before the state is taken: the checkpoint records itself as the best so far
            self.best_value, self.best_step = value, trainer.step
        state = trainer.state_dict()  # every process: it gathers each one's RNG state

        def write() -> Path:
            if self.resumed_from is not None and path.resolve() == self.resumed_from.resolve():
                return path  # resumed and stopped again at once: this very state is saved already
            if os.path.lexists(path):
                raise CheckpointError(f"{path}: already exists, and is not the checkpoint this run went on from "
                                      "(was the run directory changed by another process?); it is kept as it is")
            saved = save_checkpoint(path, trainer.model, state, self.meta)
            if improved:
                self.best_path = saved
                set_best(self.run_dir, saved)
            if self.keep_last:  # prune all but the newest keep_last, sparing the best
                for old in list_checkpoints(self.run_dir)[:-self.keep_last]:
                    if old != self.best_path:
                        shutil.rmtree(old, ignore_errors=True)
            return saved

        self.last_path = agree(write, run_here=is_main_process()) or path
        return self.last_path
