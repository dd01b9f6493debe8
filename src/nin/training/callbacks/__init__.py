"""Trainer callbacks, one module each, as the trainer calls them through :class:`~.base.Callback`'s hooks.

- :mod:`.progress`: the progress bar and a line per epoch;
- :mod:`.metrics`: ``metrics.csv``/``metrics.jsonl``, ``rollbacks.jsonl``, ``curves.png``;
- :mod:`.checkpointer`: checkpoints, the newest kept and the best.

To add a callback: subclass :class:`Callback` in a new module here and export it below; what it must
remember across a resume goes in its ``state_dict``, which the trainer keeps in every checkpoint.
"""

from nin.training.callbacks.base import HOOKS, Callback, CallbackList
from nin.training.callbacks.checkpointer import Checkpointer
from nin.training.callbacks.metrics import METRIC_FIELDS, CurvePlotter, MetricsWriter, RollbackLog
from nin.training.callbacks.progress import ProgressBar, format_metrics, format_rollback

__all__ = ["HOOKS", "METRIC_FIELDS", "Callback", "CallbackList", "Checkpointer", "CurvePlotter", "MetricsWriter",
           "ProgressBar", "RollbackLog", "format_metrics", "format_rollback"]
