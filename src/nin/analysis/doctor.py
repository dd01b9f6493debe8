"""What this machine is, what nin will do on it, and how fast it can go: ``nin doctor``.

Modelled on ``torch.utils.collect_env``, but about speed. :func:`collect` gathers a
report, a JSON-serialisable dict of sections:

* ``machine``: the CPU (model, vendor, architecture, the ISA features PyTorch's CPU
  speed depends on), logical and usable CPUs, compute threads, memory;
* ``kind``: a short stable slug and a label for the kind of machine (:func:`machine_kind`),
  named from CPU features or the GPU, never from the CPU's model name (VMs often hide it);
* ``software``: python, nin, torch, oneDNN, MKL, OpenMP, CUDA, cuDNN, NCCL, numpy, extras;
* ``gpus``: each CUDA GPU with what its compute capability gives (native bf16, TF32,
  fp16 tensor cores);
* ``defaults``: what ``nin train`` picks on the device (amp, channels_last, compile,
  BN folding, fused SGD, threads, TF32), each with its reason;
* ``measurements``: matmul peak GFLOP/s per dtype, each probe bounded by time (None
  with ``measure=False``);
* ``datasets``: what ``nin datasets`` reports (nothing is downloaded).

:func:`render` turns a report into text. :func:`fingerprint` is the cheap, stable part
(no measurement, no host name) that benchmark records embed. The readers take their
input as arguments where they can (``cpu_info(text)``, ``memory_info(text)``), and GPUs
are read through ``torch.cuda`` only, so tests can stand in for other machines.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from nin.errors import NinError

# The CPU flags, as /proc/cpuinfo spells them, that decide how fast PyTorch runs on a CPU.
X86_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8")
ARM_FEATURES = ("asimd", "sve", "sve2", "bf16", "i8mm")
X86_ARCHS = ("x86_64", "amd64", "i386", "i686")
ARM64_ARCHS = ("aarch64", "arm64")
EXTRAS = ("onnxruntime", "optuna", "keras")  # optional packages some commands use
MEASURE_SECONDS = 6.0  # the matmul probes' time budget, all dtypes together
CGROUP_ROOT = Path("/sys/fs/cgroup")
GIB = 2**30


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / GIB, 1)


# -------------------------------------------------------------------- machine


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """``key: value`` of /proc/cpuinfo, keys lowercased; the first processor's value of each key."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_info(cpuinfo_text: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """Model, vendor, architecture and speed-relevant ISA features of the CPU described by ``cpuinfo_text``
    (the text of /proc/cpuinfo; this machine's when None) on ``arch`` (this machine's when None)."""
    text = (_read("/proc/cpuinfo") or "") if cpuinfo_text is None else cpuinfo_text
    fields = _cpuinfo_fields(text)
    arch = arch or platform.machine()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    implementer = fields.get("cpu implementer")
    arm_name = f"Arm CPU (implementer {implementer}, part {fields.get('cpu part', '?')})" if implementer else None
    return {
        "model": fields.get("model name") or arm_name or platform.processor() or arch or "unknown",
        "vendor": fields.get("vendor_id") or (f"implementer {implementer}" if implementer else None),
        "arch": arch,
        "features": [f for f in X86_FEATURES + ARM_FEATURES if f in flags],
    }


def _cgroup_limit_files(cgroup_text: str, root: Path) -> Iterator[Path]:
    """Where the memory limit of the cgroups in ``cgroup_text`` (/proc/self/cgroup) may be, nearest first;
    a container sees its own cgroup as the root, hence the root's file after each."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if not controllers:  # v2, the unified hierarchy
            yield from (root / rel / "memory.max", root / "memory.max")
        elif "memory" in controllers.split(","):  # v1
            yield from (root / "memory" / rel / "memory.limit_in_bytes", root / "memory" / "memory.limit_in_bytes")


def cgroup_memory_limit(cgroup_text: str | None = None, root: Path = CGROUP_ROOT) -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, else v1); None where none is set."""
    text = (_read("/proc/self/cgroup") or "") if cgroup_text is None else cgroup_text
    for path in _cgroup_limit_files(text, root):
        value = _read(path)
        if value is not None:
            value = value.strip()
            return int(value) if value.isdigit() and int(value) < 2**60 else None  # "max", or v1's "unlimited"
    return None


def memory_info(meminfo_text: str | None = None, *, cgroup_text: str | None = None,
                cgroup_root: Path = CGROUP_ROOT) -> dict[str, float | None]:
    """Total and available memory from ``meminfo_text`` (/proc/meminfo; this machine's when None) and the
    cgroup limit, in GiB; None for what is not known."""
    text = (_read("/proc/meminfo") or "") if meminfo_text is None else meminfo_text
    kib = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        words = value.split()
        if words and words[0].isdigit():
            kib[key.strip()] = int(words[0])
    limit = cgroup_memory_limit(cgroup_text, cgroup_root)
    return {"total_gib": _gib(kib["MemTotal"] * 1024) if "MemTotal" in kib else None,
            "available_gib": _gib(kib["MemAvailable"] * 1024) if "MemAvailable" in kib else None,
            "cgroup_limit_gib": _gib(limit)}


def machine() -> dict[str, Any]:
    """The ``machine`` section: the CPU, its counts, the compute threads nin runs with, memory, the OS."""
    from nin.training.runtime import compute_threads, usable_cpus

    return {**cpu_info(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "threads": compute_threads(), "memory": memory_info(), "os": platform.platform()}


# ----------------------------------------------------------------------- GPUs


def _gpu(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    cc = tuple(torch.cuda.get_device_capability(index))
    return {"index": index, "name": torch.cuda.get_device_name(index), "memory_gib": _gib(props.total_memory),
            "compute_capability": f"{cc[0]}.{cc[1]}", "multiprocessors": props.multi_processor_count,
            "bf16_native": cc >= (8, 0),  # not torch.cuda.is_bf16_supported(): it says yes where bf16 is emulated
            "tf32": cc >= (8, 0), "fp16_tensor_cores": cc >= (7, 0)}


def gpu_info() -> list[dict[str, Any]]:
    """Each CUDA GPU torch sees: name, memory, compute capability, multiprocessors, what its capability gives."""
    if not torch.cuda.is_available():
        return []
    return [_gpu(i) for i in range(torch.cuda.device_count())]


# ----------------------------------------------------------------------- kind


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _gpu_kind(gpus: Sequence[dict[str, Any]]) -> tuple[str, str]:
    g = gpus[0]
    count = f"{len(gpus)} x " if len(gpus) > 1 else ""
    speed = ("native bf16 and TF32" if g["bf16_native"] else
             "no native bf16: fp16 tensor cores" if g["fp16_tensor_cores"] else "no tensor cores")
    return f"cuda-{_slug(g['name'])}", f"{count}{g['name']}, compute capability {g['compute_capability']}, {speed}"


def _cpu_kind(arch: str, features: set[str]) -> tuple[str, str]:
    if arch.lower() in X86_ARCHS:
        if {"amx_tile", "amx_bf16"} <= features:
            return "cpu-amx", "x86-64 CPU with AVX-512 and AMX (bf16 tiles)"
        if {"avx512f", "avx512_bf16"} <= features:
            return "cpu-avx512-bf16", "x86-64 CPU with AVX-512 and AVX512-BF16"
        if "avx512f" in features:
            return "cpu-avx512", "x86-64 CPU with AVX-512, no native bf16"
        if "avx2" in features:
            return "cpu-avx2", "x86-64 CPU with AVX2, no native bf16"
        return "cpu-other", "x86 CPU without AVX2"
    if arch.lower() in ARM64_ARCHS:
        return "cpu-arm64", "64-bit Arm CPU" + (" with bf16" if "bf16" in features else ", no bf16")
    return "cpu-other", f"{arch or 'unknown'} CPU"


def machine_kind(cpu: dict[str, Any], gpus: Sequence[dict[str, Any]] = ()) -> tuple[str, str]:
    """(slug, label) of the kind of machine: from its first GPU when it has one (``cuda-nvidia-h200``), else
    from the CPU's architecture and features (``cpu-avx2``, ``cpu-avx512-bf16``, ``cpu-amx``, ``cpu-arm64``,
    ``cpu-other``). ``cpu`` is :func:`cpu_info`'s dict, ``gpus`` :func:`gpu_info`'s list."""
    if gpus:
        return _gpu_kind(gpus)
    return _cpu_kind(str(cpu.get("arch") or ""), set(cpu.get("features") or ()))


# ------------------------------------------------------------------- software


def _version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``, without importing it; None if it is not installed."""
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _search(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def onednn_version(config: str | None = None) -> str | None:
    """oneDNN's version from ``config`` (``torch.__config__.show()``, which says e.g. "MKL-DNN v3.12.0")."""
    if config is None:
        config = torch.__config__.show() if torch.backends.mkldnn.is_available() else ""
    return _search(r"(?:MKL-DNN|oneDNN) v(\d[\w.]*)", config)


def _openmp(config: str) -> str | None:
    m = re.search(r"OpenMP (\d+)(?: \(a\.k\.a\. OpenMP ([\d.]+)\))?", config)
    if not m:
        return None
    return f"{m.group(2)} ({m.group(1)})" if m.group(2) else m.group(1)


def _cudnn() -> str | None:
    try:
        v = torch.backends.cudnn.version()
    except (RuntimeError, AttributeError):
        return None
    if not v:
        return None
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)  # 9.1.0 is 90100, 8.9.7 8907
    return f"{major}.{rest // 100}.{rest % 100}"


def _nccl() -> str | None:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError, TypeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def software() -> dict[str, Any]:
    """The ``software`` section: versions of what nin runs on, and which optional extras are installed."""
    config = torch.__config__.show()
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "nin": _version("nin"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's CPU kernels use
        "onednn": onednn_version(config) if torch.backends.mkldnn.is_available() else None,
        "mkl": _search(r"Math Kernel Library Version ([\d.]+)", config) if torch.backends.mkl.is_available() else None,
        "openmp": _openmp(config),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn(),
        "nccl": _nccl(),
        "numpy": _version("numpy"),
        "extras": {name: _version(name) for name in EXTRAS},
    }


# ------------------------------------------------------------------- defaults


def resolve(name: str = "auto") -> tuple[torch.device, str]:
    """The device ``--device name`` means here, and why; a NinError for one doctor cannot look at."""
    from nin.training.runtime import resolve_device

    device = resolve_device(name)
    if device.type not in ("cpu", "cuda"):
        raise NinError(f"doctor: --device {name}: use auto, cpu or cuda[:N]")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise NinError(f"doctor: --device {name}: there is no such GPU ({count} visible)")
    if name != "auto":
        return device, f"--device {name}"
    if device.type == "cuda":
        return device, "--device auto: torch sees a CUDA GPU"
    build = "a CPU-only build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
    return device, f"--device auto: torch sees no CUDA GPU ({build})"


def _threads_reason(n: int) -> str:
    from nin.training.runtime import usable_cpus

    usable, logical = usable_cpus(), os.cpu_count()
    if n >= usable:
        return f"one per CPU this process may run on ({usable} of {logical} logical); --threads overrides"
    omp = os.environ.get("OMP_NUM_THREADS")
    why = f"OMP_NUM_THREADS={omp}" if omp else "torch's default, one per physical core"
    return f"{why}, below the {usable} usable CPUs; --threads overrides"


def _tf32(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"value": None, "reason": "only meaningful with CUDA"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision, and warns about allow_tf32
        matmul, convs = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    has = torch.cuda.get_device_capability(device) >= (8, 0)
    return {"value": bool(matmul), "cudnn_conv": bool(convs), "float32_matmul_precision":
            torch.get_float32_matmul_precision(),
            "reason": f"as torch has it (nin changes neither): float32 matmuls {'in' if matmul else 'not in'} TF32 "
                      f"(precision {torch.get_float32_matmul_precision()!r}), cuDNN convolutions "
                      f"{'in' if convs else 'not in'} TF32"
                      + ("" if has else "; this GPU has no TF32 (it needs compute capability 8.0+)")}


def defaults(device: torch.device, device_reason: str = "") -> dict[str, Any]:
    """The ``defaults`` section: what ``nin train`` runs with on ``device`` when no flag says otherwise, and why."""
    from nin.training.config import TrainConfig
    from nin.training.precision import amp_choice
    from nin.training.runtime import compute_threads

    cfg = TrainConfig().resolved(device)  # its amp is amp_choice's
    amp_why = amp_choice(device)[1]
    cuda = device.type == "cuda"
    library = "cuDNN" if cuda else "oneDNN"
    threads = compute_threads()
    compile_why = ("on for CUDA: torch.compile fuses the model's kernels; the first compile takes about a minute"
                   if cuda else "off on CPUs: it does not pay there, and the first compile takes about a minute")
    return {
        "device": {"value": str(device), "reason": device_reason},
        "amp": {"value": cfg.amp, "grad_scaler": cfg.amp == "fp16", "reason": amp_why},
        "channels_last": {"value": cfg.channels_last,
                          "reason": f"always on: NHWC convolutions are faster in {library}"},
        "compile": {"value": cfg.compile, "reason": compile_why},
        "fold_bn": {"value": cfg.fold_bn, "reason": "evaluation runs with each BatchNorm folded into the convolution "
                                                    "before it: one op fewer per layer, the same outputs"},
        "fused": {"value": cfg.fused, "reason": "the SGD step of all parameters is one fused kernel, not a loop "
                                                "over parameters"},
        "threads": {"value": threads, "reason": _threads_reason(threads)},
        "tf32": _tf32(device),
    }


# --------------------------------------------------------------- measurements


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measurements(device: torch.device, seconds: float | None = None) -> dict[str, Any]:
    """Matmul peak GFLOP/s on ``device`` in fp32 and bf16 (and fp16 on CUDA), in ``seconds`` (default
    :data:`MEASURE_SECONDS`) shared by the dtypes, with the threads nin runs with."""
    from nin.analysis.probes import matmul_peak
    from nin.training.runtime import compute_threads

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    budget = seconds or MEASURE_SECONDS
    start = time.perf_counter()
    with _torch_threads(compute_threads()):
        threads = torch.get_num_threads() if device.type == "cpu" else None
        gflops = {name: round(matmul_peak(device, dtype, budget=budget / len(dtypes)) / 1e9, 1)
                  for name, dtype in dtypes.items()}
    return {"device": str(device), "threads": threads, "matmul_gflops": gflops,
            "seconds": round(time.perf_counter() - start, 2), "budget_seconds": budget}


# --------------------------------------------------------------------- report


def dataset_status() -> list[dict[str, Any]]:
    """The ``datasets`` section: ``nin datasets``'s rows (found where, checksum status); downloads nothing."""
    from nin.data import status

    return status(None)


def collect(device: str = "auto", measure: bool = True) -> dict[str, Any]:
    """The whole report, a JSON-serialisable dict of sections (see the module's docstring)."""
    dev, why = resolve(device)  # first: a bad --device fails before anything is measured
    cpu, gpus = machine(), gpu_info()
    slug, label = machine_kind(cpu, gpus)
    return {
        "machine": cpu,
        "kind": {"slug": slug, "label": label},
        "software": software(),
        "gpus": gpus,
        "defaults": defaults(dev, why),
        "measurements": measurements(dev) if measure else None,
        "datasets": dataset_status(),
    }


def fingerprint() -> dict[str, Any]:
    """What kind of machine and software a measurement came from: cheap (nothing is measured), stable from run
    to run, JSON-serialisable, and without the host's name. Benchmark records embed it."""
    from nin.training.runtime import usable_cpus

    cpu, gpus = cpu_info(), gpu_info()
    slug, label = machine_kind(cpu, gpus)
    return {"kind": slug, "label": label, "cpu": cpu["model"], "arch": cpu["arch"], "features": cpu["features"],
            "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "memory_gib": memory_info()["total_gib"], "torch": torch.__version__, "onednn": onednn_version(),
            "cuda": torch.version.cuda, "gpus": [g["name"] for g in gpus], "python": platform.python_version()}


# --------------------------------------------------------------------- render


