"""A small, model-agnostic trainer for image classifiers.

The :class:`Trainer` runs an optimizer it is given (the recipe's SGD, :func:`sgd`, by default) on a loss
it is given (cross-entropy by default) over a :class:`~nin.data.loader.DeviceLoader`, evaluates once per
epoch and returns the per-epoch metrics. It knows nothing about NiN: logging, progress bars, figures and
checkpoints are callbacks (:mod:`nin.training.callbacks`), called through one dispatcher, and each
callback's own state is kept in the trainer's.
Its whole state (weights aside) is :meth:`Trainer.state_dict`: epoch, position in
the epoch, running sums, optimizer buffers, RNG states and history, so a run
resumed from any step continues exactly, bit for bit, as if it had not stopped.

In a process group (``torchrun``, see :mod:`nin.training.distributed`) the model is
wrapped in ``DistributedDataParallel``; each process takes its slice of every
global batch, and the processes agree on divergence and on stopping, so they
leave the loop at the same step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nin.data.loader import DeviceLoader
from nin.errors import NinError
from nin.inference.tta import with_tta
from nin.models.fold import fold_batchnorm, has_batchnorm
from nin.training import distributed
from nin.training.callbacks.base import Callback, CallbackList
from nin.training.config import TrainConfig
from nin.training.memory import _FreedMemoryKept
from nin.training.precision import AMP_DTYPES


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps``.

    constant: ``lr``. cosine: linear warm-up, then half a cosine down to 0.
    onecycle: linear warm-up from ``lr/10``, then linear decay to 0.
    step: linear warm-up, then ``lr`` times ``gamma`` for each milestone passed.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warm = int(cfg.warmup * total_steps)
    if step < warm:
        start = cfg.lr / 10 if cfg.schedule == "onecycle" else 0.0
        return start + (cfg.lr - start) * (step + 1) / warm
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(step >= m * total_steps for m in cfg.milestones)
    frac = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (1 - frac)


class Diverged(NinError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, loss: float, note: str = "") -> None:
        self.step, self.epoch, self.loss, self.note = step, epoch, loss, note
        super().__init__(f"training diverged: loss is {loss} at step {step} (epoch {epoch + 1}){note}")


@dataclass
class _Position:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done in all
    tally: dict[str, float] = field(
        default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
    )


def sgd(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """The recipe's optimizer: SGD with the config's momentum (Nesterov or not) and weight decay, except on
    biases and norms (parameters of one dimension), fused into one kernel unless ``config.fused`` is off."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
        **({"fused": True} if config.fused else {"foreach": False}),
    )


class Trainer:
    """Train ``model`` on ``train_loader``; evaluate on ``test_loader`` after each epoch."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_loader: DeviceLoader,
        test_loader: DeviceLoader | None = None,
        callbacks: Iterable[Callback] = (),
        *,
        optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
        criterion: nn.Module | None = None,
    ) -> None:
        """``optimizer(model, config)`` builds the optimizer (default :func:`sgd`, the recipe's); ``criterion``
        is the loss (default cross-entropy with the config's label smoothing). The learning rate of every
        parameter group is set by the schedule at each step."""
        config.validate()
        self.device = train_loader.device
        self.config = config = config.resolved(self.device)
        self.model = model
        self.train_loader, self.test_loader = train_loader, test_loader
        self.callbacks = CallbackList(callbacks)
        self.dist = distributed.current()
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.dist.distributed:
            if config.sync_bn and has_batchnorm(model):
                if self.device.type == "cpu":
                    raise NinError("sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPUs "
                                   "(set train.sync_bn: false to keep per-process BatchNorm statistics)")
                model = self.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # Gradients are averaged over the processes in buckets that overlap the backward pass.
            wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None, gradient_as_bucket_view=True)
            self.step_model = torch.compile(wrapped) if config.compile else wrapped
            # Evaluation runs each process on its own share of the test set, with no collective per batch.
            self.eval_forward = torch.compile(model) if config.compile else model
        else:
            self.step_model = self.eval_forward = torch.compile(model) if config.compile else model
        self.criterion = criterion or nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.optimizer = (optimizer or sgd)(model, config)
        # fp16's range ends at 65,504, so its gradients are scaled up and the scale adapted (a step whose
        # gradients overflow is skipped); bf16 has fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        if self.scaler is not None and isinstance(self.optimizer, torch.optim.SGD) and config.momentum > 0:
            # torch's fused SGD makes its momentum buffers with empty_like on the first step and skips the
            # update when the scaler found an overflow, so a first step that overflows leaves them holding
            # whatever was in memory, and the next step turns the weights into NaN. Buffers that start at zero
            # give the same first step (buf = grad, as dampening is 0) and survive a skipped one.
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.pos = _Position()
        self.history: list[dict[str, float]] = []
        self.lr_scale = 1.0  # lowered by each rollback; multiplies the schedule's lr
        self.rollbacks: list[dict[str, float]] = []  # one event per rollback: where it diverged, the new scale
        self.start_time = 0.0  # set by fit(): when wall_time would have been zero
        self.should_stop = False  # set to stop at the next step (a signal, a callback); saved runs resume
        self.stopped = False  # fit() left early because a process asked to stop
        self._running: _Running | None = None  # this epoch's sums while it runs

    # ----------------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self.pos.epoch

    @property
    def step(self) -> int:
        return self.pos.step

    @property
    def running(self) -> _Running | None:
        """This epoch's sums while it runs (loss and correct counts on the device, examples seen); else None."""
        return self._running

    @property
    def total_steps(self) -> int:
        return self.config.epochs * len(self.train_loader)

    def autocast(self):
        if self.config.amp in AMP_DTYPES:
            return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.config.amp])
        return nullcontext()

    def eval_model(self) -> nn.Module:
        """The model to evaluate with: BatchNorm folded into the convolutions when there is any to fold."""
        if self.config.fold_bn and has_batchnorm(self.model):
            return fold_batchnorm(self.model)
        return self.eval_forward

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly: optimizer, position, RNG, history.

        Callable between any two steps. In a distributed run every process must call it
        (it gathers each process's RNG state).
        """
        if self._running is not None:
            self.pos.tally = self._running.tally()
        rngs = distributed.all_gather(_rng_state())
        tallies = distributed.all_gather(dict(self.pos.tally))  # each process's partial sums of this epoch
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "position": copy.deepcopy(asdict(self.pos)),
            "rng_ranks": rngs,  # each process's, in rank order
            "tally_ranks": tallies,
            "world_size": self.dist.world_size,
            "history": self.history,
            "config": asdict(self.config),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "callbacks": self.callbacks.state_dict(),  # each callback's own (the best value so far, ...)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; a state that does not fit is a NinError, not a partial load."""
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise NinError(f"the run was saved by {saved_world} process(es); resume it with as many "
                           f"(this is {self.dist.world_size}): the position in the epoch counts global batches")
        try:
            optimizer = copy.deepcopy(self.optimizer.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            # Saved buffers are contiguous; give each its parameter's layout (channels_last), as the fused
            # step pairs elements of a parameter and its buffers by memory position.
            for p, st in self.optimizer.state.items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise NinError(f"the saved optimizer state does not fit this model ({e})") from None
        try:
            pos = _Position(**state["position"])
            if "tally_ranks" in state:
                pos.tally = dict(state["tally_ranks"][self.dist.rank])
            rng = state["rng_ranks"][self.dist.rank] if "rng_ranks" in state else state["rng"]
            _set_rng_state(rng)
            history, rollbacks = list(state["history"]), list(state.get("rollbacks", []))
            scaler = state.get("scaler")
            if self.scaler is not None and scaler:
                self.scaler.load_state_dict(dict(scaler))
            lr_scale = float(state.get("lr_scale", 1.0))
            callback_states = state.get("callbacks") or {}  # none in checkpoints from before callbacks kept state
            if not isinstance(callback_states, dict):
                raise TypeError(f"callbacks: expected a table, got {type(callback_states).__name__}")
            if not (0 <= pos.batch <= len(self.train_loader) and pos.epoch >= 0 and pos.step >= 0):
                raise ValueError(f"position {asdict(pos)} is outside this run's {len(self.train_loader)} "
                                 "batches per epoch")
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            self.optimizer.load_state_dict(optimizer)
            raise NinError(f"the saved trainer state is malformed ({e})") from None
        self.pos, self.history, self.rollbacks, self.lr_scale = pos, history, rollbacks, lr_scale
        self.callbacks.load_state_dict(callback_states)

    @property
    def callbacks(self) -> CallbackList:
        """The callbacks, in the order their hooks are called; assign any list of them to replace them."""
        return self._callbacks

    @callbacks.setter
    def callbacks(self, callbacks: Iterable[Callback]) -> None:
        self._callbacks = CallbackList(callbacks)

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict[str, float]]:
        """Train until ``config.epochs`` (or ``max_steps``); return the per-epoch metrics."""
        cfg = self.config
        # A resumed run's wall time continues from the last recorded epoch (evaluation included).
        done = (self.history[-1]["wall_time"] if self.history else 0.0) + self.pos.tally["seconds"]
        self.start_time = time.perf_counter() - done
        self.callbacks.call("on_fit_start", self)
        with _FreedMemoryKept(self.device):
            while self.pos.epoch < cfg.epochs and not self._out_of_steps() and not self.stopped:
                snapshot = self._snapshot() if cfg.on_diverge == "rollback" else None
                try:
                    finished = self._train_epoch()
                except Diverged as e:
                    if snapshot is None:
                        raise
                    self._roll_back(snapshot, e)
                    continue
                if not finished:
                    break
                metrics = self._end_epoch()
                self.callbacks.call("on_epoch_end", self, metrics)
        self.callbacks.call("on_fit_end", self)
        return self.history

    def _snapshot(self) -> dict[str, Any]:
        """A copy of everything an epoch changes: weights and buffers, optimizer, position, RNG."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                              "position": asdict(self.pos), "rng": _rng_state()})

    def _roll_back(self, snapshot: dict[str, Any], e: Diverged) -> None:
        """Restore ``snapshot`` and lower the learning rate, or re-raise once the rollbacks are spent."""
        cfg = self.config
        if len(self.rollbacks) >= cfg.max_rollbacks:
            raise Diverged(e.step, e.epoch, e.loss, note=f" after {len(self.rollbacks)} rollback(s) "
                                                         f"(lr scale {self.lr_scale:g})") from None
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(snapshot["scaler"])
        self.pos = _Position(**copy.deepcopy(snapshot["position"]))
        _set_rng_state(snapshot["rng"])
        self.lr_scale *= cfg.rollback_factor
        loss = e.loss if math.isfinite(e.loss) else str(e.loss)  # "nan"/"inf": the log stays strict JSON
        event = {"step": e.step, "epoch": e.epoch + 1, "loss": loss, "resumed_at_step": self.pos.step,
                 "lr_scale": self.lr_scale, "wall_time": time.perf_counter() - self.start_time}
        self.rollbacks.append(event)
        self.callbacks.call("on_rollback", self, event)

    def _out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.pos.step >= self.config.max_steps

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if stopped early (``max_steps`` or a stop request)."""
        cfg, pos, model = self.config, self.pos, self.step_model
        loader = self.train_loader
        loader.set_epoch(pos.epoch)
        self.model.train()
        # Running sums of this epoch stay on the device while it runs (no host syncs).
        run = self._running = _Running.start(pos.tally, self.device)
        losses = torch.zeros(len(loader), device=self.device)
        checked = pos.batch
        check_every = cfg.check_every or (1 if self.device.type == "cpu" else 50)
        total = self.total_steps
        try:
            for x, y in loader.iterate(start=pos.batch):
                lr = lr_at(cfg, pos.step, total) * self.lr_scale
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with self.autocast():
                    out = model(x)
                    loss = self.criterion(out, y)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is None:
                    loss.backward()
                    self.optimizer.step()
                else:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                loss = loss.detach()
                losses[pos.batch] = loss
                run.add(loss, out, y)
                pos.batch += 1
                pos.step += 1
                # A stop request is acted on at once in a single process; processes agree at each check.
                if pos.batch - checked >= check_every or (self.should_stop and not self.dist.distributed):
                    self.stopped = self._check(losses, checked, pos.batch)
                    checked = pos.batch
                self.callbacks.call("on_step_end", self, loss)
                if (self._out_of_steps() or self.stopped) and pos.batch < len(loader):
                    break
            self.stopped = self._check(losses, checked, pos.batch) or self.stopped
            pos.tally = run.tally()
        finally:
            self._running = None
        return pos.batch >= len(loader)

    def _check(self, losses: torch.Tensor, start: int, end: int) -> bool:
        """Raise :class:`Diverged` if a loss in ``losses[start:end]`` is not finite on any process;
        return whether any process asked to stop."""
        window = losses[start:end]
        stop = self.should_stop
        if self.dist.distributed:  # one small all-reduce: a NaN or inf anywhere spreads to every process
            flags = torch.cat([window.float(), torch.tensor([float(stop)], device=self.device)])
            torch.distributed.all_reduce(flags)
            window, stop = flags[:-1], bool(flags[-1] > 0)
        if window.numel() and not bool(torch.isfinite(window).all()):
            first = start + int((~torch.isfinite(window)).nonzero()[0])
            step = self.pos.step - (self.pos.batch - first)
            raise Diverged(step + 1, self.pos.epoch, float(window[first - start]))
        return stop

    def _end_epoch(self) -> dict[str, float]:
        pos, t = self.pos, self.pos.tally
        loss_sum, correct, seen = _all_reduce([t["loss_sum"], t["correct"], t["seen"]], self.device)
        metrics = {
            "epoch": pos.epoch + 1,
            "step": pos.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "examples_per_sec": seen / max(t["seconds"], 1e-9),
            "epoch_time": t["seconds"],
        }
        if self.test_loader is not None:
            self.callbacks.call("on_eval_start", self)  # e.g. an EMA puts its averaged weights in
            try:
                ev = evaluate(with_tta(self.eval_model(), self.config.tta), self.test_loader, self.criterion,
                              self.autocast)
            finally:
                self.callbacks.call("on_eval_end", self)
            metrics |= {"test_loss": ev["loss"], "test_acc": ev["acc"]}
        metrics["wall_time"] = time.perf_counter() - self.start_time
        self.history.append(metrics)
        self.pos = _Position(epoch=pos.epoch + 1, batch=0, step=pos.step)
        return metrics


@dataclass
class _Running:
    """An epoch's running sums while it runs: loss and correct counts on the device, examples and time on the host."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    seconds: float  # time spent in earlier parts of this epoch (before a resume)
    t0: float

    @classmethod
    def start(cls, tally: dict[str, float], device: torch.device) -> _Running:
        return cls(torch.tensor(float(tally["loss_sum"]), device=device),
                   torch.tensor(float(tally["correct"]), device=device),
                   int(tally["seen"]), float(tally["seconds"]), time.perf_counter())

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += (out.argmax(1) == y).sum()
        self.seen += len(y)

    def tally(self) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum), "correct": float(self.correct), "seen": self.seen,
                "seconds": self.seconds + time.perf_counter() - self.t0}


def _rng_state() -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all processes of a distributed run (identity otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DeviceLoader,
    criterion: nn.Module | None = None,
    autocast=nullcontext,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (eval mode, no autograd)."""
    criterion = criterion or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    n = 0
    with _FreedMemoryKept(loader.device):  # each batch's activations reuse the last one's memory
        for x, y in loader:
            with autocast():
                out = model(x)
            loss_sum += criterion(out.float(), y).double() * len(y)
            correct += (out.argmax(1) == y).sum()
            n += len(y)
    model.train(was_training)
    loss, right, n = _all_reduce([float(loss_sum), float(correct), n], loader.device)
    return {"loss": loss / max(n, 1), "acc": right / max(n, 1), "n": n}


