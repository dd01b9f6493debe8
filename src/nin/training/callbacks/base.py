"""The callback contract: the hooks the trainer calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nin.training.trainer import Trainer


class Callback:
    """Hooks the trainer calls. Override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_rollback(self, trainer: Trainer, event: dict[str, float]) -> None:
        """The loss diverged and the trainer went back to the start of the epoch (``--on-diverge rollback``)."""

    def on_fit_end(self, trainer: Trainer) -> None: ...
