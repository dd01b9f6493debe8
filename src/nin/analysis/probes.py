"""Probes of a device: what it can compute (a timed matmul), how much memory a process has used at its peak
(CUDA's allocator, or the process's peak RSS on a CPU, with a window that can be reset), and its name."""

from __future__ import annotations

import platform
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` in a ``/proc`` text file, or None where there is none (or no /proc)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA: allocator statistics; Linux: the RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes: peak CUDA allocation, or the process's peak resident set size since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_field("/proc/self/status", "VmHWM")  # e.g. "1068500 kB"
    if hwm:
        return int(hwm.split()[0]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak(device: torch.device, dtype: torch.dtype, *, min_seconds: float = 0.02, reps: int = 5,
                budget: float | None = None) -> float:
    """Peak FLOP/s of an ``n x n`` matmul in ``dtype``, ``n`` grown until one product takes ``min_seconds``.

    A product of two ``n x n`` matrices is counted as ``2 n^3`` FLOPs; the best of ``reps`` runs is kept.
    ``budget`` (seconds), when given, bounds the whole probe, however slow ``dtype`` is here: ``n`` stops
    growing when the next size's products would not fit in it, and fewer runs are timed if it runs out.

    The product goes into one preallocated output (``out=``): a fresh 32 MiB result per product is a
    fresh ``mmap`` on Linux, whose page faults (the kernel zeroing 8,192 pages) made each 4096^3 bf16
    product about 12% slower on a 2-core AMX CPU and so under-measured the peak (inflating MFU).
    """
    start = time.perf_counter()
    n, top = 256, (16384 if device.type == "cuda" else 4096)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=c)
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        took = time.perf_counter() - t0
        if took >= min_seconds or n >= top:
            break
        if budget is not None and time.perf_counter() - start + 8 * took * (reps + 2) > budget:
            break  # the next size's products (8x as long each) would not fit
        n *= 2
    best = float("inf")
    for i in range(reps):
        if budget is not None and i and time.perf_counter() - start >= budget:
            break
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
