"""The callback contract: the hooks the trainer calls, through one dispatcher, and each callback's own state.

A callback overrides the hooks it needs. One that must remember something across a resume (the best value
seen so far, say) returns it from :meth:`Callback.state_dict` as plain values and takes it back in
:meth:`Callback.load_state_dict`; the trainer keeps every callback's state in its own
(:meth:`~nin.training.trainer.Trainer.state_dict`), under the callback's :attr:`Callback.state_key`, so it
travels in each checkpoint. :class:`CallbackList` is the one place the hooks are called from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from nin.errors import NinError

if TYPE_CHECKING:
    from nin.training.trainer import Trainer

HOOKS = ("on_fit_start", "on_step_end", "on_eval_start", "on_eval_end", "on_epoch_end", "on_rollback", "on_fit_end")


class Callback:
    """Hooks the trainer calls. Override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None: ...

    def on_eval_start(self, trainer: Trainer) -> None:
        """The epoch's evaluation is about to run on ``trainer.model`` (an EMA swaps its weights in here)."""

    def on_eval_end(self, trainer: Trainer) -> None:
        """The epoch's evaluation is done (before ``on_epoch_end``, which gets its metrics)."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        """The loss diverged and the trainer went back to the start of the epoch (``--on-diverge rollback``)."""

    def on_fit_end(self, trainer: Trainer) -> None: ...

    @property
    def state_key(self) -> str:
        """Where this callback's state is kept in the trainer's: its class name (two of a kind need their own)."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """What this callback must remember across a resume: plain values (they go in meta.json) and tensors
        (they go in state.safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


class CallbackList(list):
    """The trainer's callbacks, in order, and the one place their hooks are called and their state gathered."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        super().__init__(callbacks)

    def call(self, hook: str, trainer: Trainer, *args: Any) -> None:
        """Call ``hook`` (one of :data:`HOOKS`) on every callback, in order."""
        if hook not in HOOKS:
            raise ValueError(f"no callback hook {hook!r}; the hooks are {', '.join(HOOKS)}")
        for cb in self:
            getattr(cb, hook)(trainer, *args)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every callback's state that is not empty, by :attr:`Callback.state_key`."""
        states: dict[str, dict[str, Any]] = {}
        for cb in self:
            state = cb.state_dict()
            if state:
                if cb.state_key in states:
                    raise NinError(f"two callbacks keep their state under {cb.state_key!r}; give one another "
                                   "state_key")
                states[cb.state_key] = state
        return states

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each callback its saved state (a callback with none saved, as from an older checkpoint, keeps
        its own and works it out in ``on_fit_start``)."""
        for cb in self:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
