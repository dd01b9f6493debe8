"""Live curves for long runs: a TensorBoard event stream in ``RUN/tensorboard/`` (``nin train --tensorboard``).

Everything is logged against the global step, so the curves share one axis:

- every ``every`` steps: ``step/loss`` (the mean over the steps since the last point), ``step/lr``,
  ``step/running_train_acc`` (the epoch so far) and ``step/images_per_sec``. Reading a value from a GPU makes
  the host wait for it, so the callback reads only then; in between it adds the losses up on the device;
- at each epoch's end: ``epoch/train_loss``, ``epoch/train_acc``, ``epoch/test_loss``, ``epoch/test_acc``,
  ``epoch/examples_per_sec``, and the image ``cam``: class activation maps (:mod:`nin.inference.cam`) of a few
  fixed test images. They are computed in eval mode without autograd and draw no random numbers, so the
  training is the same, to the last bit, with or without this callback;
- at the end of ``fit``: the run's settings as hyper-parameters, with the final metrics (TensorBoard's HParams
  tab), in ``RUN/tensorboard/hparams/``, rewritten at each end so a resumed run has one row.

Resume: the stream is flushed whenever a checkpoint takes this callback's state, and the state holds the open
window of losses, so a run resumed from that checkpoint writes the very points an uninterrupted run would. Points
an earlier attempt wrote after its last checkpoint are hidden (the writer's ``purge_step``) and written again, so
there are none missing and none twice; a rollback (``--on-diverge rollback``) hides the discarded epoch's likewise.
Put it before the :class:`~nin.training.callbacks.Checkpointer`, so an epoch's points precede its checkpoint.

In a distributed run only the main process writes (its step loss and running accuracy are those of its own
share of each batch; the epoch metrics are over all processes); a failed write stops every process.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from nin.atomic import write_error
from nin.errors import NinError
from nin.training.callbacks.base import Callback
from nin.training.distributed import agree, is_main_process

if TYPE_CHECKING:
    from nin.training.trainer import Trainer

TENSORBOARD_DIR = "tensorboard"  # in the run directory
HPARAMS_DIR = "hparams"  # in TENSORBOARD_DIR: the settings and final metrics, as their own TensorBoard run
CAM_IMAGES = 8  # fixed test images in each epoch's class-map figure, in rows of CAM_COLUMNS
CAM_COLUMNS = 4
EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec")
FINAL_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def require_tensorboard():
    """torch's ``SummaryWriter``; a one-line :class:`NinError` naming the package where it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NinError("--tensorboard needs the tensorboard package, which is not installed: pip install "
                       "tensorboard (or pip install 'nin[tensorboard]')") from None
    return SummaryWriter


def hparams_of(config: dict[str, Any]) -> dict[str, float | int | str]:
    """A run's settings (``RunConfig.to_dict()``) as TensorBoard hyper-parameters: dotted names
    (``train.lr``, ``model.options.width``), with numbers as they are and anything else (booleans, None, lists)
    as text, since TensorBoard would show a boolean as 0 or 1 and leave None out."""
    flat: dict[str, float | int | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix[:-1]] = value
        elif isinstance(value, (list, tuple)):
            flat[prefix[:-1]] = ",".join(str(v) for v in value)
        else:  # True -> "true", None -> "none"
            flat[prefix[:-1]] = str(value).lower() if isinstance(value, bool) or value is None else str(value)

    walk("", config)
    return flat


class TensorBoard(Callback):
    """Scalars every ``every`` steps, epoch metrics and a class-map figure per epoch, and the hyper-parameters
    at the end, into ``log_dir`` (see the module's description). ``hparams``: the settings to show (default:
    the trainer's train settings); ``classes``: class names for the figure's titles."""

    def __init__(self, log_dir: str | os.PathLike, every: int = 50, *, hparams: dict[str, Any] | None = None,
                 classes: list[str] | None = None, cam_images: int = CAM_IMAGES) -> None:
        if every < 1:
            raise NinError(f"the TensorBoard interval must be at least 1 step, got {every}")
        self.log_dir, self.every = Path(log_dir), every
        self.hparams, self.classes, self.cam_images = dict(hparams or {}), classes, cam_images
        self._writer = None  # the SummaryWriter, on the main process while fit runs
        self._loss_sum: torch.Tensor | None = None  # losses since the last point, on the device (main process)
        self._loss_steps = 0
        self._step = 0  # the trainer's step when last seen
        self._clock: float | None = None  # when the images counted for images/sec began
        self._images = 0
        self._cam: tuple[torch.Tensor, torch.Tensor] | None = None  # the figure's test images and labels (CPU)
        self._figure = None  # this epoch's CAM figure, drawn while the evaluated weights were in place
        self._error: NinError | None = None  # a write that failed between two agreed points
        self._restored: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The step and the open window of losses. A checkpoint is being taken: what was logged up to it is
        flushed to disk first, so resuming from it loses no point."""
        if self._loss_sum is None:
            return {}  # not the main process: it writes nothing
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as e:  # raised on every process at the next agreed point
                self._error = self._error or write_error(self.log_dir, e)
        return {"step": self._step, "loss_sum": float(self._loss_sum), "loss_steps": self._loss_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        self._step, self._clock, self._error = trainer.step, None, None
        saved = self._restored if self._restored.get("step") == trainer.step else {}  # else: none of this run's
        self._restored = {}
        agree(lambda: self._open(trainer, saved), run_here=is_main_process())

    def _open(self, trainer: Trainer, saved: dict[str, Any]) -> None:
        summary_writer = require_tensorboard()
        self._loss_sum = torch.tensor(float(saved.get("loss_sum", 0.0)), device=trainer.device)
        self._loss_steps = int(saved.get("loss_steps", 0))
        self._cam = self._cam_images(trainer)
        if not self.hparams:
            self.hparams = hparams_of({"train": asdict(trainer.config)})
        try:
            # Points after this step are an earlier attempt's, written after its last checkpoint: TensorBoard
            # hides every point from purge_step on, and this run writes them again.
            self._writer = summary_writer(str(self.log_dir), purge_step=trainer.step + 1, flush_secs=30)
        except OSError as e:
            raise write_error(self.log_dir, e) from None

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self._step = trainer.step
        if self._writer is None or self._error is not None:
            return
        self._loss_sum += loss.detach().float()  # no host sync: the value stays on the device
        self._loss_steps += 1
        if self._clock is None:  # the first step since this epoch's training began (or went on)
            running = trainer.running
            self._clock, self._images = (running.t0 if running is not None else time.perf_counter()), 0
        loader = trainer.train_loader
        done = (trainer.pos.batch - 1) * loader.global_batch
        self._images += max(0, min(loader.global_batch, len(loader.images) - done))
        if trainer.step % self.every == 0:
            try:
                self._log_step(trainer)
            except OSError as e:  # raised on every process at the next agreed point
                self._error = write_error(self.log_dir, e)

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        def write() -> None:
            self._raise_pending()
            step = int(metrics["step"])
            try:
                for key in EPOCH_METRICS:
                    if key in metrics:
                        self._writer.add_scalar(f"epoch/{key}", metrics[key], step)
                if self._cam is not None:
                    figure, self._figure = self._figure or self._cam_figure(trainer), None
                    self._writer.add_figure("cam", figure, step)
                self._writer.flush()
            except OSError as e:
                raise write_error(self.log_dir, e) from None

        agree(write, run_here=self._writer is not None)
        self._clock = None  # evaluation and the other callbacks are not training time

    def on_eval_start(self, trainer: Trainer) -> None:
        # The maps of the weights being evaluated: an EMA's average, when the run keeps one, is in place now.
        if self._writer is not None and self._cam is not None:
            self._figure = self._cam_figure(trainer)

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        self._step, self._clock, self._loss_steps = trainer.step, None, 0

        def purge() -> None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self._raise_pending()
            self._loss_sum.zero_()
            # The epoch starts again: hide its points so far, as a resumed run's writer does.
            self._writer.file_writer.add_event(Event(step=trainer.step + 1,
                                                     session_log=SessionLog(status=SessionLog.START)))

        agree(purge, run_here=self._writer is not None)

    def on_fit_end(self, trainer: Trainer) -> None:
        def write() -> None:
            writer, self._writer = self._writer, None
            try:
                self._raise_pending()
                if trainer.history:
                    self._write_hparams(writer, trainer)
            except OSError as e:
                raise write_error(self.log_dir, e) from None
            finally:
                writer.close()

        agree(write, run_here=self._writer is not None)

    # ---------------------------------------------------------------- writing
    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _log_step(self, trainer: Trainer) -> None:
        """One point of each step scalar: one read from the device for the loss and the running accuracy."""
        running = trainer.running  # the epoch's sums so far, on the device
        values = [self._loss_sum / self._loss_steps]  # this call's step is in the window: never empty
        if running is not None and running.seen:
            values.append(running.correct / running.seen)
        read = torch.stack(values).tolist()
        now = time.perf_counter()  # after the read: the device has done every step counted
        step, w = trainer.step, self._writer
        w.add_scalar("step/loss", read[0], step)
        w.add_scalar("step/lr", trainer.optimizer.param_groups[0]["lr"], step)
        if len(read) > 1:
            w.add_scalar("step/running_train_acc", read[1], step)
        w.add_scalar("step/images_per_sec", self._images / max(now - self._clock, 1e-9), step)
        self._loss_sum.zero_()
        self._loss_steps, self._clock, self._images = 0, now, 0

    def _cam_images(self, trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first test images of this process's share (the first of the test set on the main process), or
        None where there is no figure: no test set, or a model whose head has no class maps."""
        from nin.inference.cam import check_cam_model

        loader = trainer.test_loader
        if loader is None or self.cam_images < 1:
            return None
        try:
            check_cam_model(trainer.model)
        except NinError:
            return None
        n = min(self.cam_images, len(loader.images))
        return loader.images[:n].cpu(), loader.labels[:n].cpu()

    def _cam_figure(self, trainer: Trainer):
        """The fixed test images, each with its top class's map, computed with the weights as they are now."""
        from nin.inference.cam import cam_figure, cam_panels

        images, labels = self._cam
        model, loader = trainer.model, trainer.test_loader
        view = SimpleNamespace(model=model, classes=self.classes or _Numbered(),  # what cam_panels needs
                               loader=lambda x: [(loader.transform(x.to(loader.device)), None)])
        was_training = model.training
        try:
            with torch.no_grad():
                flat = [row[0] for row in cam_panels(view, images, 1, labels)]
        finally:
            model.train(was_training)
        panels = [flat[i:i + CAM_COLUMNS] for i in range(0, len(flat), CAM_COLUMNS)]
        return cam_figure(panels, f"top class map at step {trainer.step}")

    def _write_hparams(self, writer, trainer: Trainer) -> None:
        """The settings with the last epoch's metrics and the best test accuracy, replacing an earlier end's."""
        last = trainer.history[-1]
        metrics = {f"hparam/{k}": float(last[k]) for k in FINAL_METRICS if k in last}
        tests = [h["test_acc"] for h in trainer.history if "test_acc" in h]
        if tests:
            metrics["hparam/best_test_acc"] = float(max(tests))
        folder = self.log_dir / HPARAMS_DIR
        for old in folder.glob("events.out.tfevents.*") if folder.is_dir() else []:
            old.unlink()
        writer.add_hparams(self.hparams, metrics, run_name=HPARAMS_DIR, global_step=trainer.step)


class _Numbered:
    """Class names where none were given: the class numbers."""

    def __getitem__(self, k: int) -> str:
        return str(k)
