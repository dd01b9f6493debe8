"""How fast a model trains and infers here, and how close that is to what the hardware can do.

For one model, input size, batch size and device, :func:`run_bench` measures,
after warm-up and as the median of several timed blocks:

* training images/sec through the real :class:`~nin.training.trainer.Trainer` and
  :class:`~nin.data.loader.DeviceLoader` (data pipeline included: uint8 images on the
  device, resized and normalized per batch there);
* inference images/sec: eval mode, no autograd, BatchNorm folded, large batches;
* batch-1 latency: one uint8 image to a class index;
* peak memory of each case: the process's resident-set high-water mark on a CPU
  (reset before each case), ``max_memory_allocated`` on CUDA;
* model FLOPs utilization (MFU): achieved FLOP/s (:func:`nin.analysis.profile.count_flops`
  times images/sec) over the peak FLOP/s of a square matmul probed in this
  process in the dtype the case computes in.

``baseline=True`` also times the seed's way (:mod:`nin.analysis.seed_way`) on the same
data, and ``ablate`` re-times the fast path with each speed switch flipped.
:func:`time_to_accuracy` trains a recipe on real data and reports when each
test-accuracy threshold was first reached.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch

from nin.analysis.probes import device_name, matmul_peak, peak_memory, reset_peak_memory, sync
from nin.analysis.profile import count_flops
from nin.bounds import MAX_IMAGE_SIDE, bounded, check_ranges, range_of, setting, within
from nin.data.loader import DeviceLoader
from nin.errors import NinError
from nin.models import create_model, init_weights, model_entry
from nin.models.fold import has_batchnorm
from nin.training.callbacks.base import Callback
from nin.training.config import SPEED, TrainConfig
from nin.training.precision import AMP_DTYPES, amp_choice, bf16_native
from nin.training.trainer import Trainer, evaluate


@dataclass
class BenchConfig:
    """What ``nin bench`` times; each field with help text is a flag of it (:mod:`nin.cli.options`)."""

    model: str = setting("nin_d2l", "registered model (default nin_d2l)")
    size: int | None = bounded(None, 1, MAX_IMAGE_SIDE, help="input side (default: the model's)")
    batch_size: int = within(range_of(TrainConfig, "batch_size"), 128,
                             help="images per training step and per inference batch (default 128)")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    # The fast path takes its speed switches (SPEED: amp, channels_last, compile, fused, fold_bn; "auto"/None pick
    # per device) from this config; the rest of the timed recipe is fixed (constant lr 0.01, no label smoothing).
    train: TrainConfig = field(default_factory=TrainConfig)
    # timing
    warmup: int = bounded(1, 0, 10_000, help="untimed steps first (default 1)")
    steps: int | None = bounded(None, 1, 10**6, help="steps per timed block (default: about --block-seconds)")
    block_seconds: float = bounded(2.0, 0, 3600, lo_open=True, help="seconds per timed block, when --steps is not "
                                                                    "given (default 2)")
    repeats: int = bounded(3, 1, 1000, help="timed blocks; the median is reported")
    latency_runs: int = bounded(20, 1, 100_000, help="batch-1 calls timed; the median is reported (default 20)")
    data: Literal["auto", "real", "synthetic"] = setting(
        "auto", "auto: real Fashion-MNIST when found locally, else synthetic uint8 images")
    data_dir: str | None = setting(None, "directory holding the data files", path=True)
    workers: int = bounded(4, 0, 256, help="DataLoader workers of the baseline (default 4)")

    def validate(self) -> None:
        check_ranges(self)
        self.train.validate()
        if self.data not in ("auto", "real", "synthetic"):
            raise NinError(f"unknown data choice {self.data!r}; choose auto, real or synthetic")

    def settings(self) -> dict[str, Any]:
        """The settings as one flat mapping, the speed switches among them (what a result records)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "train":
                out.update({s: getattr(self.train, s) for s in SPEED})
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def with_switch(self, switch: str, value: Any) -> BenchConfig:
        """A copy with one speed switch changed."""
        return replace(self, train=replace(self.train, **{switch: value}))


@dataclass
class CaseResult:
    name: str
    dtype: str
    train_img_s: float
    infer_img_s: float
    latency_ms: float
    train_peak_bytes: int
    infer_peak_bytes: int
    train_flop_s: float
    train_mfu: float
    infer_mfu: float
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ machine


# --------------------------------------------------------------------- data


def bench_data(cfg: BenchConfig, channels: int, device: torch.device):
    """(train images, train labels, test images, test labels, description): uint8 on ``device``."""
    if cfg.data != "synthetic" and channels == 1:
        from nin.data.idx import DataError
        from nin.data.sources import load_split

        try:
            xtr, ytr = load_split("fashion-mnist", "train", cfg.data_dir, False)
            xte, yte = load_split("fashion-mnist", "test", cfg.data_dir, False)
            return xtr.to(device), ytr.to(device), xte.to(device), yte.to(device), "Fashion-MNIST (real)"
        except DataError as e:
            if cfg.data == "real":
                raise
            why = str(e).split(";")[0]
    elif cfg.data == "real":
        raise NinError(f"real data is Fashion-MNIST (1 channel); the model takes {channels} channels")
    else:
        why = "synthetic requested" if cfg.data == "synthetic" else f"{channels}-channel model"
    g = torch.Generator().manual_seed(0)
    side = 28 if channels == 1 else 32
    x = torch.randint(0, 256, (20000, channels, side, side), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (20000,), generator=g)
    return x[:16000].to(device), y[:16000].to(device), x[16000:].to(device), y[16000:].to(device), \
        f"synthetic uint8 {channels}x{side}x{side} ({why})"


# -------------------------------------------------------------------- cases


class _StepClock(Callback):
    """Records the time (after a device sync) when the trainer reaches each of ``marks`` steps."""

    def __init__(self, marks: list[int], device: torch.device):
        self.marks, self.device, self.times = set(marks), device, {}

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.step in self.marks:
            sync(self.device)
            self.times[trainer.step] = time.perf_counter()


def _median_rate(times: list[float], images_per_block: int) -> float:
    return statistics.median(images_per_block / max(b - a, 1e-12) for a, b in zip(times, times[1:]))


def _latencies(classify: Callable[[], int], runs: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``runs`` calls of ``classify`` (which returns a host int, so it waits for the device)."""
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        classify()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _steps_for(cfg: BenchConfig, step_seconds: float) -> int:
    return cfg.steps or max(1, min(1000, round(cfg.block_seconds / max(step_seconds, 1e-6))))


def fast_case(cfg: BenchConfig, data, device: torch.device, flops: tuple[int, int], peaks: dict[str, float],
              name: str = "nin") -> tuple[CaseResult, int]:
    """Time the project's own path; returns the result and the steps per block it used.

    The whole case runs inside one :class:`nin.training.memory._FreedMemoryKept` (what each ``fit`` and ``evaluate``
    enters on a CPU), so that its warm-up also warms the allocator: otherwise each of the case's several
    ``fit``/``evaluate`` calls would give its memory back on leaving and start its first timed step or
    batch by page-faulting it in again, a start-up cost a real run pays once (the 3-batch inference
    blocks measured 560 img/s that way, 769-874 without it). The seed's way runs outside it, as the seed did.
    """
    from nin.training.memory import _FreedMemoryKept

    with _FreedMemoryKept(device):
        return _fast_case(cfg, data, device, flops, peaks, name)


def _fast_case(cfg: BenchConfig, data, device: torch.device, flops: tuple[int, int], peaks: dict[str, float],
               name: str) -> tuple[CaseResult, int]:
    from nin.training.memory import _FreedMemoryKept

    xtr, ytr, xte, yte = data[:4]
    size = cfg.size or model_entry(cfg.model).input_size[1]
    torch.manual_seed(0)
    model = init_weights(create_model(cfg.model), "xavier").to(device)
    tcfg = TrainConfig(
        epochs=10**6, batch_size=cfg.batch_size, lr=0.01, schedule="constant", label_smoothing=0.0,
        **{s: getattr(cfg.train, s) for s in SPEED},
    ).resolved(device)
    loader = DeviceLoader(xtr, ytr, cfg.batch_size, shuffle=True, size=(size, size),
                          channels_last=tcfg.channels_last)
    reset_peak_memory(device)

    # Warm-up (compilation included), then one probe step to size the timed blocks.
    probe = Trainer(model, replace(tcfg, max_steps=cfg.warmup + 1), loader)
    clock = _StepClock([cfg.warmup, cfg.warmup + 1], device) if cfg.warmup else None
    probe.callbacks = [clock] if clock else []
    t0 = time.perf_counter()
    probe.fit()
    sync(device)
    start = time.perf_counter()
    step_s = (clock.times[cfg.warmup + 1] - clock.times[cfg.warmup]) if clock else start - t0
    steps = _steps_for(cfg, step_s)
    marks_at = [cfg.warmup + 1 + steps * k for k in range(cfg.repeats + 1)]
    clock = _StepClock(marks_at, device)
    probe.config = replace(probe.config, max_steps=marks_at[-1])
    probe.callbacks = [clock]
    probe.fit()
    train_rate = _median_rate([start] + [clock.times[m] for m in marks_at[1:]], steps * cfg.batch_size)
    train_peak = peak_memory(device)

    # Inference: the trainer's own evaluation model (BatchNorm folded where there is any), no autograd.
    eval_model = probe.eval_model().eval()  # training is over for this case
    if tcfg.compile and eval_model is not probe.step_model:  # a folded copy is not compiled yet
        eval_model = torch.compile(eval_model)
    _FreedMemoryKept.release()  # training's kept memory is not inference's: its peak starts from here
    reset_peak_memory(device)
    n_eval = min(len(xte), steps * cfg.batch_size)
    eval_loader = DeviceLoader(xte[:n_eval], yte[:n_eval], cfg.batch_size, size=(size, size),
                               channels_last=tcfg.channels_last)
    warm_loader = DeviceLoader(xte[: cfg.batch_size], yte[: cfg.batch_size], cfg.batch_size, size=(size, size),
                               channels_last=tcfg.channels_last)
    for _ in range(max(cfg.warmup, 1)):
        evaluate(eval_model, warm_loader, autocast=probe.autocast)
    rates = []
    for _ in range(cfg.repeats):
        sync(device)
        t0 = time.perf_counter()
        evaluate(eval_model, eval_loader, autocast=probe.autocast)
        sync(device)
        rates.append(n_eval / (time.perf_counter() - t0))
    infer_rate = statistics.median(rates)

    # Batch-1 latency: a uint8 image on the device to a class index on the host.
    def classify_one() -> int:
        with torch.inference_mode(), probe.autocast():
            return int(eval_model(eval_loader.transform(xte[:1])).argmax(1))

    lat = _latencies(classify_one, cfg.latency_runs)
    infer_peak = peak_memory(device)

    dtype = tcfg.amp if tcfg.amp in AMP_DTYPES else "fp32"
    settings = {"amp": tcfg.amp, "channels_last": tcfg.channels_last, "compile": tcfg.compile,
                "fused": tcfg.fused, "fold_bn": tcfg.fold_bn and has_batchnorm(model)}
    return _result(name, dtype, train_rate, infer_rate, lat, train_peak, infer_peak, flops, peaks, settings), steps


@contextmanager
def _no_worker_count_warning() -> Iterator[None]:
    """The seed asks for 4 workers whatever the core count; DataLoader's warning about that is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


def baseline_case(cfg: BenchConfig, data, device: torch.device, flops: tuple[int, int],
                  peaks: dict[str, float], steps: int) -> CaseResult:
    """Time the seed's way (:class:`nin.analysis.seed_way.SeedWay`) on the same data, over the same number of steps."""
    from nin.analysis.seed_way import SeedWay

    xtr, ytr, xte, yte = (t.cpu() for t in data[:4])
    size = cfg.size or model_entry(cfg.model).input_size[1]
    def rate(run: Callable[[int], int]) -> float:
        """Median images/sec of ``run(steps)`` over the timed blocks, after a warm-up call."""
        run(max(cfg.warmup, 1))
        sync(device)
        times = [time.perf_counter()]
        for _ in range(cfg.repeats):
            run(steps)
            sync(device)
            times.append(time.perf_counter())
        return _median_rate(times, steps * cfg.batch_size)

    reset_peak_memory(device)
    with _no_worker_count_warning(), SeedWay(xtr, ytr, xte, yte, batch_size=cfg.batch_size, size=size,
                                             workers=cfg.workers, device=device) as way:
        train_rate = rate(way.train_steps)
        train_peak = peak_memory(device)
        reset_peak_memory(device)
        infer_rate = rate(way.infer_batches)
        lat = _latencies(lambda: way.predict_one(xte[0]), cfg.latency_runs)
        infer_peak = peak_memory(device)
    settings = {"amp": "none", "channels_last": False, "compile": False, "fused": False, "fold_bn": False,
                "loader": f"DataLoader, {cfg.workers} workers, PIL resize per image"}
    return _result("seed's way", "fp32", train_rate, infer_rate, lat, train_peak, infer_peak, flops, peaks, settings)


def _result(name, dtype, train_rate, infer_rate, lat, train_peak, infer_peak, flops, peaks, settings) -> CaseResult:
    fwd, step = flops
    peak = peaks[dtype]
    return CaseResult(
        name=name, dtype=dtype, train_img_s=train_rate, infer_img_s=infer_rate,
        latency_ms=1000 * statistics.median(lat), train_peak_bytes=train_peak, infer_peak_bytes=infer_peak,
        train_flop_s=step * train_rate, train_mfu=step * train_rate / peak, infer_mfu=fwd * infer_rate / peak,
        settings=settings,
    )


# ---------------------------------------------------------------------- run


#: The fast path's speed switches; ``--ablate`` re-times it with each one flipped.
SWITCHES = ("channels_last", "fused", "fold_bn", "compile", "amp")


def _flipped(switch: str, value: Any) -> tuple[str, Any]:
    """(label, new value) for ``switch`` flipped from its resolved ``value``."""
    if switch == "amp":
        new = "none" if value in AMP_DTYPES else "bf16"
        return f"amp {new}", new
    return f"{switch} {'off' if value else 'on'}", not value


def run_bench(cfg: BenchConfig, *, baseline: bool = False, ablate: bool | Sequence[str] = False,
              report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; ``report`` receives the header lines and one line per finished case.

    ``ablate``: True flips every switch of :data:`SWITCHES` in turn, or name the ones to flip.
    """
    from nin.training.runtime import resolve_device

    cfg.validate()
    switches = list(SWITCHES) if ablate is True else list(ablate or [])
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise NinError(f"unknown switch(es) to ablate: {', '.join(unknown)}; choose from {', '.join(SWITCHES)}")
    entry = model_entry(cfg.model)
    if baseline and cfg.model != "nin_d2l":
        raise NinError(f"--baseline re-implements the seed's nin_d2l; use --model nin_d2l (got {cfg.model})")
    device = resolve_device(cfg.device)
    channels = entry.input_size[0]
    size = cfg.size or entry.input_size[1]
    model = create_model(cfg.model)
    try:
        flops = (count_flops(model, (channels, size, size)), count_flops(model, (channels, size, size), train=True))
    except RuntimeError as e:
        raise NinError(f"input {size}x{size} does not fit {cfg.model}: {str(e).splitlines()[0]}") from None
    resolved = cfg.train.resolved(device)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    if resolved.amp == "fp16":
        peaks["fp16"] = matmul_peak(device, torch.float16)
    data = bench_data(cfg, channels, device)
    header = {
        "model": cfg.model, "input": f"{channels}x{size}x{size}", "batch_size": cfg.batch_size,
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "bf16_native": bf16_native(device), "data": data[4],
        "peak_flop_s": peaks, "flops_forward": flops[0], "flops_train_step": flops[1],
        "date": time.strftime("%Y-%m-%d"),
    }
    report(f"nin bench: {cfg.model} {header['input']}, batch {cfg.batch_size}, on {device} "
           f"({header['device_name']}), torch {torch.__version__}, {header['date']}")
    report(f"data: {data[4]}, uint8 on the device")
    amp_note = f" (auto: {amp_choice(device)[1]})" if cfg.train.amp == "auto" else ""
    report(f"fast path: {resolved.amp + ' autocast' if resolved.amp in AMP_DTYPES else 'fp32'}{amp_note}, "
           f"{'channels_last' if resolved.channels_last else 'NCHW'}, compile {'on' if resolved.compile else 'off'}, "
           f"{'fused' if resolved.fused else 'per-parameter'} SGD step, BN folding "
           f"{'on' if resolved.fold_bn else 'off'}{'' if has_batchnorm(model) else ' (model has no BN)'}")
    report(f"peak FLOP/s (matmul probe): fp32 {peaks['fp32'] / 1e9:,.1f} G, bf16 {peaks['bf16'] / 1e9:,.1f} G")
    report(f"work: {flops[0] / 1e9:.3f} GFLOP per image forward, {flops[1] / 1e9:.3f} per training image")
    report("")
    report(_row_header())
    fast, steps = fast_case(cfg, data, device, flops, peaks)
    report(_row(fast))
    cases = [fast]
    timing = (f"medians of {cfg.repeats} timed blocks of {steps} step(s) / batch(es) after {cfg.warmup} warm-up; "
              f"latency: median of {cfg.latency_runs}")
    if baseline:
        base = baseline_case(replace(cfg, steps=steps), data, device, flops, peaks, steps)
        report(_row(base))
        cases.append(base)
        ratios = (fast.train_img_s / base.train_img_s, fast.infer_img_s / base.infer_img_s,
                  base.latency_ms / fast.latency_ms)
        report(f"{'speed-up':<16}" + "".join(f"{r:>11.2f}x" for r in ratios))
    for switch in switches:
        if switch == "fold_bn" and not has_batchnorm(model):
            continue
        label, value = _flipped(switch, getattr(resolved, switch))
        r, _ = fast_case(replace(cfg.with_switch(switch, value), steps=steps), data, device, flops, peaks, name=label)
        report(_row(r) + f"   train {r.train_img_s / fast.train_img_s:.2f}x, infer "
               f"{r.infer_img_s / fast.infer_img_s:.2f}x")
        cases.append(r)
    report("")
    report(f"timing: {timing}; MFU: model FLOP/s over the matmul peak in the case's dtype; "
           f"memory: {'max_memory_allocated' if device.type == 'cuda' else 'peak RSS of this process'}")
    return {"settings": cfg.settings(), "steps_per_block": steps, **header, "cases": [asdict(c) for c in cases]}


def _row_header() -> str:
    return (f"{'case':<16}{'train img/s':>12}{'infer img/s':>12}{'b1 ms':>12}{'train MFU':>11}{'infer MFU':>11}"
            f"{'mem train':>11}{'mem infer':>11}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _row(r: CaseResult) -> str:
    return (f"{r.name:<16}{r.train_img_s:>12,.1f}{r.infer_img_s:>12,.1f}{r.latency_ms:>12,.1f}{r.train_mfu:>11.1%}"
            f"{r.infer_mfu:>11.1%}{_gib(r.train_peak_bytes):>11}{_gib(r.infer_peak_bytes):>11}")


# ------------------------------------------------------------ time to accuracy


class _AccuracyClock(Callback):
    def __init__(self, t0: float, targets: list[float], report: Callable[[str], None]):
        self.t0, self.targets, self.report = t0, sorted(targets), report
        self.reached: dict[float, dict[str, float]] = {}
        self.epochs: list[dict[str, float]] = []

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        now = time.perf_counter() - self.t0
        acc = metrics.get("test_acc", float("nan"))
        self.epochs.append({"epoch": metrics["epoch"], "test_acc": acc, "seconds": now,
                            **{k: metrics[k] for k in ("train_loss", "train_acc", "test_loss") if k in metrics}})
        self.report(f"epoch {metrics['epoch']:>3}  test acc {acc:.4f}  at {now:7.1f} s")
        for t in self.targets:
            if t not in self.reached and acc >= t:
                self.reached[t] = {"epoch": metrics["epoch"], "seconds": now, "test_acc": acc}


def process_age() -> float:
    """Seconds since this process started (Linux), so start-up and imports count; 0 where unknown."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def time_to_accuracy(cfg, targets: list[float], report: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` (a :class:`nin.training.config.RunConfig`) and report when each test-accuracy target is first
    reached.

    The clock starts when the process started, so interpreter start-up, imports and data loading count.
    """
    from nin.training.run import train

    t0 = time.perf_counter() - process_age()
    clock = _AccuracyClock(t0, targets, report)
    with tempfile.TemporaryDirectory(prefix="nin-bench-") as tmp:
        result = train(cfg, os.path.join(tmp, "run"), callbacks=[clock], progress=False)
    total = time.perf_counter() - t0
    for t in clock.targets:
        hit = clock.reached.get(t)
        report(f"test accuracy {t:.2%}: " + (f"reached at {hit['seconds']:.1f} s (epoch {hit['epoch']}, "
                                               f"{hit['test_acc']:.4f})" if hit else "not reached"))
    report(f"whole run: {total:.1f} s, final test accuracy {result.history[-1]['test_acc']:.4f}" if result.history
           else f"whole run: {total:.1f} s")
    return {"targets": {str(t): clock.reached.get(t) for t in clock.targets}, "epochs": clock.epochs,
            "seconds": total, "config": cfg.to_dict()}
