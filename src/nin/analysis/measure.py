"""Measured peak memory of a real training step and a real inference, to set beside
:mod:`nin.analysis.profile`'s estimates.

Training runs :class:`~nin.training.trainer.Trainer` itself for two optimizer steps on random
images (the second step is the steady state: the momentum buffers exist), with
the trainer's own settings except ``torch.compile``, which is off so the step is
the eager one the estimate models. Inference runs the model the trainer evaluates
with (BatchNorm folded) in eval mode under ``torch.inference_mode``.

What is measured is every byte the allocator hands out from the moment the
model is built to the end of the run, at its highest:

* on CUDA, ``torch.cuda.max_memory_allocated`` less what was allocated before;
* on a CPU, the allocations and frees of PyTorch's CPU allocator recorded by
  ``torch.profiler`` with ``profile_memory=True``, summed in time order.

The data set itself (uint8, resident before the run starts) is not counted;
the float32 batches made from it are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nin.data.loader import DeviceLoader
from nin.models.fold import fold_batchnorm, has_batchnorm
from nin.training.config import TrainConfig
from nin.training.precision import AMP_DTYPES
from nin.training.trainer import Trainer


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocator_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Highest number of bytes allocated on ``device`` while ``fn`` runs, counting only what ``fn`` allocates."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _data(batch: int, input_size: tuple[int, ...], classes: int, device: torch.device, steps: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * steps, *input_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (batch * steps,), generator=g)
    return images.to(device), labels.to(device)


def measure_training(build: Callable[[], nn.Module], input_size: tuple[int, int, int], batch: int,
                     device: torch.device, *, amp: str = "none", optimizer: str = "momentum",
                     channels_last: bool | None = None) -> int:
    """Peak bytes of building ``build()`` on ``device`` and running two real training steps at ``batch``."""
    with torch.device("meta"):  # only to read the class count; allocates nothing
        classes = build().num_classes
    images, labels = _data(batch, input_size, classes, device, steps=2)
    momentum = {"sgd": 0.0, "momentum": 0.9}.get(optimizer)
    if momentum is None:
        raise ValueError(f"the trainer measures sgd or momentum, not {optimizer!r}")
    cfg = TrainConfig(epochs=1, batch_size=batch, amp=amp, compile=False, channels_last=channels_last,
                      momentum=momentum, nesterov=momentum > 0, schedule="constant", check_every=1)
    cl = cfg.resolved(device).channels_last

    def run() -> None:
        model = build().to(device)
        loader = DeviceLoader(images, labels, batch, shuffle=True, channels_last=cl)
        Trainer(model, cfg, loader).fit()

    return allocator_peak(run, device)


def measure_inference(build: Callable[[], nn.Module], input_size: tuple[int, int, int], batch: int,
                      device: torch.device, *, amp: str = "none", channels_last: bool | None = None) -> int:
    """Peak bytes of classifying one batch with the evaluation model on ``device``, the model's own bytes included.

    The evaluation model (BatchNorm folded, as the trainer evaluates) is made first
    and its parameters and buffers are counted as they are; the peak allocated while
    one batch is made and classified is added.
    """
    images, labels = _data(batch, input_size, 2, device, steps=1)
    cfg = TrainConfig(amp=amp, compile=False, channels_last=channels_last).resolved(device)
    model = build().to(device)
    if cfg.fold_bn and has_batchnorm(model):
        model = fold_batchnorm(model)
    model.eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    loader = DeviceLoader(images, labels, batch, channels_last=cfg.channels_last)
    autocast = (torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp]) if cfg.amp in AMP_DTYPES
                else contextlib.nullcontext())

    def run() -> None:
        x, _ = next(iter(loader))
        with torch.inference_mode(), autocast:
            model(x)

    return weights + allocator_peak(run, device)


def measure_both(build: Callable[[], nn.Module], input_size: tuple[int, int, int], batch: int, device: torch.device,
                 *, amp: str = "none", optimizer: str = "momentum", channels_last: bool | None = None) -> dict:
    """Measured training and inference peaks, with how and where they were measured."""
    from nin.analysis.probes import device_name

    training = measure_training(build, input_size, batch, device, amp=amp, optimizer=optimizer,
                                channels_last=channels_last)
    inference = measure_inference(build, input_size, batch, device, amp=amp, channels_last=channels_last)
    cl = TrainConfig(channels_last=channels_last).resolved(device).channels_last
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak of PyTorch's CPU allocator, recorded by torch.profiler")
    return {"training": training, "inference": inference, "device": device_name(device),
            "method": f"{method}; {'channels_last' if cl else 'NCHW'}, two trainer steps and one inference"}
