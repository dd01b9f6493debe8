"""Memory a training process keeps: glibc's malloc told to reuse freed blocks, instead of returning them to the
kernel, while a fit or an evaluation runs."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch


class _FreedMemoryKept:
    """While inside, glibc's malloc keeps freed memory for reuse instead of giving it back to the kernel.

    A training step allocates and frees about a GiB of activations and gradients, most of it in blocks
    larger than glibc's mmap threshold (at most 32 MiB); each such block is a fresh ``mmap`` whose pages
    the kernel faults in and zeroes on first touch, and ``munmap``-ed when freed: for ``nin_d2l`` on a 2-core
    CPU about 290,000 page faults and 0.5 s of system time per step. With mmap off and a high trim threshold
    the blocks come from the heap and stay there: after the first step hardly a page is faulted in again
    (the step took 0.60-0.64x the time, ``benchmarks/step_breakdown.py --mode steps``; peak RSS grows by
    about 0.4 GiB, as freed blocks are reused rather than unmapped). On leaving, mmap is allowed again,
    the kept memory is returned (``malloc_trim``), and glibc is left as it settles in a process that
    frees large blocks (mmap threshold 32 MiB, trim threshold 64 MiB: fixed now, no longer adapting). Used by
    :meth:`Trainer.fit` and :func:`evaluate`; reentrant (a count); a no-op off Linux/glibc, for other
    devices, and with ``NIN_KEEP_FREED_MEMORY=0`` in the environment (for A/B timing, per process).
    """

    _depth = 0
    _lock = threading.Lock()
    _libc: Any = None

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu" and os.environ.get("NIN_KEEP_FREED_MEMORY", "1") != "0"

    @classmethod
    def _glibc(cls) -> Any:
        if cls._libc is None:
            cls._libc = False
            if sys.platform.startswith("linux"):
                import ctypes
                import platform

                if platform.libc_ver()[0] == "glibc":
                    try:
                        cls._libc = ctypes.CDLL("libc.so.6")
                    except OSError:
                        pass
        return cls._libc

    @classmethod
    def release(cls) -> None:
        """Give the kept memory back to the kernel now (``malloc_trim``); it is faulted in again when reused."""
        libc = cls._glibc()
        if libc:
            libc.malloc_trim(0)

    def __enter__(self) -> _FreedMemoryKept:
        libc = self._glibc() if self.active else False
        if not libc:
            self.active = False
            return self
        with self._lock:
            if _FreedMemoryKept._depth == 0:
                libc.mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, not from fresh mmaps
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and freed ones stay there
            _FreedMemoryKept._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        with self._lock:
            _FreedMemoryKept._depth -= 1
            if _FreedMemoryKept._depth == 0:
                libc = self._glibc()
                # glibc's steady state once a process has freed a large block: its threshold adapts up to
                # 32 MiB, the trim threshold follows at twice that. (Setting any of them stops the adapting,
                # so the 128 KiB start values would leave every block over 128 KiB to mmap from now on.)
                libc.mallopt(_M_MMAP_MAX, 65536)
                libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
                libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)
