"""Trainer callbacks, one module each, as the trainer calls them through :class:`~.base.Callback`'s hooks.

- :mod:`.progress`: the progress bar and a line per epoch;
- :mod:`.metrics`: ``metrics.csv``/``metrics.jsonl``, ``rollbacks.jsonl``, ``curves.png``;
- :mod:`.checkpointer`: checkpoints, the newest kept and the best;
- :mod:`.ema`: an exponential moving average of the weights, evaluated and checkpointed in their place;
- :mod:`.tensorboard`: live curves, class maps and the settings for TensorBoard (``--tensorboard``).

To add a callback: subclass :class:`Callback` in a new module here and export it below; what it must
remember across a resume goes in its ``state_dict``, which the trainer keeps in every checkpoint.
"""

from nin.training.callbacks.base import HOOKS, Callback, CallbackList
from nin.training.callbacks.checkpointer import Checkpointer
from nin.training.callbacks.ema import EMA
from nin.training.callbacks.metrics import METRIC_FIELDS, CurvePlotter, MetricsWriter, RollbackLog
from nin.training.callbacks.progress import ProgressBar, format_metrics, format_rollback
from nin.training.callbacks.tensorboard import TensorBoard

__all__ = ["EMA", "HOOKS", "METRIC_FIELDS", "Callback", "CallbackList", "Checkpointer", "CurvePlotter", "MetricsWriter",
           "ProgressBar", "RollbackLog", "TensorBoard", "format_metrics", "format_rollback"]
