"""Progress: a bar per epoch and a line per finished epoch."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from nin.training.callbacks.base import Callback
from nin.training.distributed import is_main_process

if TYPE_CHECKING:
    from nin.training.trainer import Trainer


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
