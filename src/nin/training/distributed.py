"""Data-parallel training under ``torchrun``: process group set-up and agreement between processes.

``torchrun --nproc-per-node N -m nin train ...`` starts N copies of the same
command with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. :func:`setup`
joins them into one process group (NCCL when each process drives a GPU, gloo on
CPUs) and gives each process its device: ``cuda:LOCAL_RANK`` or the CPU.
The trainer then wraps the model in ``DistributedDataParallel``; the loaders cut
each global batch into one slice per process.

A run's set-up has steps only one process should take (create the run directory,
read a checkpoint) and steps that can fail on one process only (a missing data
file on one machine). :func:`on_main` and :func:`agree` make every process
raise the same :class:`~nin.errors.NinError` instead of leaving the others
waiting forever on a collective the failed process never reaches.

Leaving the group (:func:`teardown`, or :func:`joined` around a whole command) must stop gloo's
worker threads before the interpreter exits. Each collective's work object holds its tensors, and the
gloo thread that ran it drops them a moment after the collective completes; for tensors made in Python
(``all_gather_object``'s are) that deallocates Python objects and takes the GIL. If the interpreter has
begun exiting meanwhile (``Py_FinalizeEx``), CPython ends that thread with ``pthread_exit`` inside a
``noexcept`` C++ destructor, and the process dies: "terminate called without an active exception",
SIGABRT (now and then SIGSEGV), once in a few dozen 2-process runs on a busy machine. Destroying the
group joins its threads first, provided nothing else still holds the group: see :func:`setup` and
:func:`teardown` for what did.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nin.errors import NinError

T = TypeVar("T")

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class ProcessError(NinError):
    """An error of this process alone (its GPU, its environment), found before the processes are joined:
    every process reports its own. Other errors are the same on every process and the main one reports them."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a run: rank among all processes, rank on its machine, and how many."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environment(environ: dict[str, str] | None = None) -> DistEnv:
    """The ranks ``torchrun`` set in the environment (a single process when none are set)."""
    env = os.environ if environ is None else environ
    if not any(k in env for k in ENV_VARS):
        return DistEnv()
    values = {}
    for key in ENV_VARS:
        try:
            values[key] = int(env.get(key, "0" if key != "WORLD_SIZE" else "1"))
        except ValueError:
            raise ProcessError(f"environment variable {key}={env[key]!r} is not an integer (set by torchrun)") from None
    rank, local, world = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ProcessError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}")
    return DistEnv(rank, local, world)


def current() -> DistEnv:
    """This process's place in the initialized process group (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistEnv(dist.get_rank(), local, dist.get_world_size())


def is_main_process() -> bool:
    return current().is_main


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device_name: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group ``torchrun`` describes; return this process's place in it.

    Without torchrun's variables (or with a world of one) nothing is initialized. With
    ``auto`` or ``cuda``, each process takes the GPU of its local rank (made its current
    device; :func:`nin.training.runtime.resolve_device` then names it); ``cpu`` runs every process on
    the CPU over gloo.
    """
    env = from_environment()
    if not env.distributed:
        return env
    if not dist.is_available():
        raise NinError(f"this torch build ({torch.__version__}) has no torch.distributed")
    wants_cuda = device_name == "cuda" or device_name.startswith("cuda:") or (
        device_name == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ProcessError(f"device {device_name!r} requested but CUDA is not available "
                               f"(torch {torch.__version__})")
        if device_name.startswith("cuda:"):
            raise NinError(f"--device {device_name} names one GPU; under torchrun each process takes the GPU of "
                           "its LOCAL_RANK: pass --device cuda")
        if env.local_rank >= torch.cuda.device_count():
            raise ProcessError(f"local rank {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                           "lower --nproc-per-node")
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    if not dist.is_initialized():
        # Before the group exists: ten functions of torch.distributed.nn.functional take
        # ``group=group.WORLD`` as a default argument, evaluated at import. Imported once the group exists
        # (DistributedDataParallel's first construction imports it, through torch.distributed._shard), they
        # hold the group for good: destroy_process_group cannot destroy it, and its gloo threads outlive
        # teardown into the interpreter's exit (see the module docstring). Imported now, the defaults are None.
        importlib.import_module("torch.distributed.nn")

        kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend_for(device), timeout=_dt.timedelta(minutes=timeout_minutes), **kw)
        except (RuntimeError, ValueError) as e:  # the rendezvous failed: a wrong address, a timeout
            raise ProcessError(f"process {env.rank} could not join the others ({e})") from None
    return env


def teardown(*, synchronize: bool = True, timeout_seconds: float = 120.0) -> None:
    """Leave the process group: wait for the other processes (``synchronize``), then destroy the group.

    Destroying it joins its threads, which finish dropping the last collectives' tensors while the
    interpreter is still whole (see the module docstring). Objects that still hold the group (a
    ``DistributedDataParallel`` model caught in a reference cycle) are collected first, so that the
    group dies here, its last reference dropped without the GIL, and not during the interpreter's exit.

    ``synchronize``: a barrier first (at most ``timeout_seconds`` on gloo), so no process tears down
    while another is still talking to it. Only where every process is known to arrive: on an error path
    the others may be inside another collective. Without a process group this does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if synchronize:
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=_dt.timedelta(seconds=timeout_seconds), wait_all_ranks=True)
                else:
                    dist.barrier()
            except RuntimeError:  # another process is late or gone: leave anyway, torchrun reports that one
                pass
    finally:
        gc.collect()
        dist.destroy_process_group()


def _release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames ``error``'s traceback holds (its chained errors'
    too): a distributed model among them would keep the process group alive past :func:`teardown`.
    The traceback still prints as before (file, line and code)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        stack += [e.__cause__, e.__context__]


@contextmanager
def joined(device_name: str = "auto") -> Iterator[DistEnv]:
    """:func:`setup` on entry; on exit, however it happens (a return, an error, KeyboardInterrupt),
    :func:`teardown`, synchronized only after a normal exit. Without torchrun this only yields the
    single-process :class:`DistEnv`."""
    env = setup(device_name)
    if not env.distributed:
        yield env
        return
    ok = False
    try:
        yield env
        ok = True
    except BaseException as e:
        _release_frames(e)
        raise
    finally:
        teardown(synchronize=ok)


def agree(fn: Callable[[], T], *, run_here: bool = True) -> T | None:
    """Run ``fn`` where ``run_here``; if it raises on any process, every process raises.

    A :class:`NinError` is raised everywhere with the failing process's message; any other
    exception is re-raised where it happened and turned into a NinError on the others.
    Returns ``fn``'s result where it ran, None elsewhere. Without a process group this is ``fn()``.
    """
    env = current()
    if not env.distributed:
        return fn() if run_here else None
    result, error, original = None, None, None
    if run_here:
        try:
            result = fn()
        except NinError as e:
            error, original = str(e), e
        except Exception as e:  # a bug on one process: the others must not hang waiting for it
            error, original = f"process {env.rank} failed: {type(e).__name__}: {e}", e
    errors: list[str | None] = [None] * env.world_size
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        if original is not None and not isinstance(original, NinError):
            raise original
        raise NinError(first) from None
    return result


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and give its result to every process (errors too)."""
    env = current()
    if not env.distributed:
        return fn()
    result = agree(fn, run_here=env.is_main)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on each machine's first process, then on the rest (e.g. a download, then reading the files)."""
    env = current()
    if not env.distributed:
        return fn()
    first = agree(fn, run_here=env.local_rank == 0)
    rest = agree(fn, run_here=env.local_rank != 0)
    return first if env.local_rank == 0 else rest


def all_gather(obj: T) -> list[T]:
    """``obj`` from every process, in rank order (``[obj]`` without a process group)."""
    env = current()
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
