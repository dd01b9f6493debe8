"""An exponential moving average (EMA) of the weights, evaluated and checkpointed in their place.

After every optimizer step the average moves towards the weights:
``avg <- d * avg + (1 - d) * w``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
early average is not dominated by the random initial weights (a warm-up; with decay 0.999 the average
covers roughly the last 1,000 steps). Buffers (BatchNorm's running statistics) are averaged the same way;
integer buffers are copied. The averaging is :class:`torch.optim.swa_utils.AveragedModel`'s.

At each evaluation the averaged weights stand in for the model's (swapped in on ``on_eval_start``, swapped
back on ``on_eval_end``), so the test accuracy a run reports, and the best checkpoint it keeps, are the
average's. The average and its count travel in every checkpoint (this callback's state), so a resumed run
continues it exactly; :func:`averaged_weights` reads it back for inference (:mod:`nin.inference.trained`).
After a rollback (``--on-diverge rollback``) the average starts again from the restored weights, as it
may hold the diverged ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim.swa_utils import AveragedModel

from nin.errors import NinError
from nin.training.callbacks.base import Callback

if TYPE_CHECKING:
    from nin.training.trainer import Trainer

STATE_KEY = "EMA"  # where the average lives in the trainer's state, and so in a checkpoint


class EMA(Callback):
    """Keep an exponential moving average of ``trainer.model``'s weights with decay ``decay``; see the module."""

    state_key = STATE_KEY

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise NinError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged: AveragedModel | None = None
        self.updates = 0  # steps averaged so far (AveragedModel's n_averaged, kept on the host)
        self._pending: dict[str, Any] | None = None  # state given back before the model was seen
        self._live: list[torch.Tensor] | None = None  # the model's own tensors while the average stands in

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        if self.averaged is None:
            self.averaged = AveragedModel(trainer.model, multi_avg_fn=self._average, use_buffers=True)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        n = self.updates  # counted on the host: reading n_averaged on a GPU would sync every step
        self._decay_now = min(self.decay, (1 + n) / (10 + n))
        self.averaged.update_parameters(trainer.model)
        self.updates += 1

    def on_eval_start(self, trainer: Trainer) -> None:
        tensors = _tensors(trainer.model)
        self._live = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for t, a in zip(tensors, _tensors(self.averaged.module)):
                t.copy_(a)

    def on_eval_end(self, trainer: Trainer) -> None:
        if self._live is None:
            return
        with torch.no_grad():
            for t, live in zip(_tensors(trainer.model), self._live):
                t.copy_(live)
        self._live = None

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        self.averaged.n_averaged.zero_()  # the next update copies the restored weights
        self.updates = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return dict(self._pending or {})
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().clone() for k, v in self.averaged.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.averaged is None:
            self._pending = state
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        try:
            weights, updates = state["weights"], int(state["updates"])
            self.averaged.module.load_state_dict(weights)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise NinError(f"the saved weight average does not fit this model ({' '.join(str(e).split())[:200]})") \
                from None
        self.averaged.n_averaged.fill_(updates)
        self.updates = updates

    # -------------------------------------------------------------- averaging
    _decay_now = 0.0

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n: torch.Tensor) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - self._decay_now)
        else:  # counters (BatchNorm's num_batches_tracked)
            for a, c in zip(averaged, current):
                a.copy_(c)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters, then the buffers, in AveragedModel's order."""
    return [*model.parameters(), *model.buffers()]


def averaged_weights(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The averaged weights a trainer state (a checkpoint's) holds, or None for a run without an EMA."""
    ema = (state.get("callbacks") or {}).get(STATE_KEY)
    return ema.get("weights") if isinstance(ema, dict) else None
