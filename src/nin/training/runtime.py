"""The process and the device a run works on: compute threads, the CUDA allocator, which device a name means."""

from __future__ import annotations

import os

import torch

from nin.errors import NinError
from nin.training import distributed


def configure_runtime(threads: int | None = None) -> None:
    """Thread and allocator set-up for the process, before any work.

    CPU: one compute thread per core this process may run on (``threads`` overrides),
    never more, so a container's CPU limit is not oversubscribed. CUDA: the caching
    allocator grows segments in place (``expandable_segments``) instead of keeping
    many fixed blocks, unless ``PYTORCH_CUDA_ALLOC_CONF`` is already set.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    n = compute_threads(threads)
    if threads or n != torch.get_num_threads():
        torch.set_num_threads(n)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all logical CPUs where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compute_threads(threads: int | None = None) -> int:
    """The compute threads :func:`configure_runtime` runs with, without setting them: ``threads`` when
    given, else torch's own count capped at :func:`usable_cpus`."""
    return threads or min(torch.get_num_threads(), usable_cpus())


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here; in a distributed run, ``auto``/``cuda`` is this process's local-rank GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NinError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NinError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    env = distributed.current()
    if env.distributed and device.type == "cuda":
        if device.index is not None:
            raise NinError(f"--device {name} names one GPU; in a distributed run each process takes the GPU of "
                           "its LOCAL_RANK: pass --device cuda")
        device = torch.device("cuda", env.local_rank)
    return device
