"""Stopping a run cleanly on SIGINT or SIGTERM: the trainer finishes its step, its callbacks save a checkpoint,
and the run can be resumed."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nin.training.trainer import Trainer


@contextmanager
def stop_on_signals(trainer: Trainer, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                    file=None) -> Iterator[list[int]]:
    """While inside, SIGINT or SIGTERM asks ``trainer`` to stop after the current step (its callbacks then
    save a checkpoint); a second signal stops at once. Yields the list of signals received.

    Only the main thread can take signals; elsewhere this does nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handle(signum: int, frame: Any) -> None:
        received.append(signum)
        if trainer.should_stop:  # the second one: give up at once
            for s, h in previous.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        trainer.should_stop = True
        if trainer.dist.is_main:
            print(f"\nnin: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(send it again to stop at once)", file=file or sys.stderr, flush=True)

    for s in signals:
        signal.signal(s, handle)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
