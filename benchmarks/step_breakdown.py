"""Where a training step of nin_d2l goes on a CPU: op-time shares, per-layer convolutions, A/B of the fast paths.

    python benchmarks/step_breakdown.py                  # op-time shares of a few steps (torch.profiler)
    python benchmarks/step_breakdown.py --before         # the same with the fixes of docs/bf16-cpu-notes.md off
    python benchmarks/step_breakdown.py --mode onednn    # per-layer oneDNN primitives of one step (ONEDNN_VERBOSE)
    python benchmarks/step_breakdown.py --mode ab        # fused conv+ReLU / space-to-depth, interleaved A/B
    python benchmarks/step_breakdown.py --mode peak      # the bench's matmul probe against longer probes and convs
    python benchmarks/step_breakdown.py --mode seed --steps 3 --rounds 3   # the seed's way alone, fresh process
    python benchmarks/step_breakdown.py --mode steps [--no-keep-memory]    # step time, page faults, system time
    python benchmarks/step_breakdown.py --mode infer [--no-keep-memory]    # evaluate() img/s, batches of 128
    python benchmarks/step_breakdown.py --mode flags     # torch.backends.mkldnn.deterministic, interleaved A/B
    python benchmarks/step_breakdown.py --mode micro     # the per-op alternatives tried (and not adopted)
    python benchmarks/step_breakdown.py --mode check     # fused == module by module; s2d's numerics vs fp32

Per-process switches (``--no-keep-memory``, environment variables such as ``OMP_PROC_BIND``) are compared
by alternating processes: ``for i in 1 2 3; do python3 ... --mode steps --no-keep-memory; python3 ...
--mode steps; done``.

Every mode builds the step exactly as ``nin bench`` does (``nin.analysis.bench.fast_case``): the real Trainer and
DeviceLoader on real Fashion-MNIST (uint8 on the device, resized 28 -> 224 per batch), batch 128, bf16
autocast, channels_last, fused SGD. ``--before`` turns off the allocator fix (``NIN_KEEP_FREED_MEMORY=0``,
which must act before the first step, so it is per process) and the fused blocks (``nin.models``' switches).

The profile runs without ``record_shapes``: recording shapes keeps tensors' metadata and slowed these
steps 2-3x here (it is not a neutral observer), so per-layer convolution times come from oneDNN's own
verbose timings instead (``--mode onednn``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

import torch

# (category, op names): an event's self time goes to the innermost enclosing event that has a category.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("conv forward", ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "aten::convolution",
                      "_ConvReLU")),
    ("conv backward", ("aten::convolution_backward", "_ConvReLUBackward",
                       "autograd::engine::evaluate_function: _ConvReLUBackward")),
    ("ReLU forward", ("aten::relu_", "aten::relu", "aten::clamp_min_", "aten::clamp_min")),
    ("ReLU backward", ("aten::threshold_backward", "autograd::engine::evaluate_function: ReluBackward0")),
    ("max-pool forward", ("aten::max_pool2d_with_indices",)),
    ("max-pool backward (incl. zero fill)", ("aten::max_pool2d_with_indices_backward",
                                             "autograd::engine::evaluate_function: MaxPool2DWithIndicesBackward0")),
    ("dropout forward", ("aten::dropout", "aten::native_dropout", "aten::bernoulli_")),
    ("dropout backward", ("autograd::engine::evaluate_function: NativeDropoutBackward0",
                          "autograd::engine::evaluate_function: MulBackward0")),
    ("space-to-depth (first conv)", ("nin.s2d",)),
    ("loader: gather, uint8->float, resize, normalize", ("nin.data.loader",)),
    ("loss (log-softmax, NLL) fwd+bwd", ("nin.loss", "autograd::engine::evaluate_function: NllLossBackward0",
                                         "autograd::engine::evaluate_function: LogSoftmaxBackward0")),
    ("autocast casts fp32->bf16 (weights, input)", ("aten::to", "aten::_to_copy")),
    ("grad casts bf16->fp32 + accumulate", ("autograd::engine::evaluate_function: ToCopyBackward0",
                                            "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad")),
    ("optimizer step (fused SGD)", ("Optimizer.step#SGD.step",)),
    ("zero_grad", ("Optimizer.zero_grad#SGD.zero_grad",)),
    ("running sums, argmax, loss check", ("nin.running", "nin.check")),
    ("global avg pool, flatten", ("aten::adaptive_avg_pool2d", "aten::mean",
                                  "autograd::engine::evaluate_function: MeanBackward1")),
]
CATEGORY = {name: cat for cat, names in RULES for name in names}


def build(args):
    from nin.data.loader import DeviceLoader
    from nin.data.sources import load_split
    from nin.models import create_model, init_weights
    from nin.training.config import TrainConfig
    from nin.training.trainer import Trainer

    xtr, ytr = load_split("fashion-mnist", "train", None, False)
    torch.manual_seed(0)
    model = init_weights(create_model("nin_d2l"), "xavier")
    cfg = TrainConfig(epochs=10**6, batch_size=args.batch_size, lr=0.01, schedule="constant",
                      label_smoothing=0.0).resolved(torch.device("cpu"))
    loader = DeviceLoader(xtr, ytr, args.batch_size, shuffle=True, size=(224, 224),
                          channels_last=cfg.channels_last)
    return Trainer(model, replace(cfg, max_steps=0 + 1), loader)


def set_switches(fused: bool, s2d: bool) -> None:
    import nin.models.nin as M

    M.FUSED_CPU_BLOCKS, M.SPACE_TO_DEPTH_FIRST_CONV = fused, s2d


def run_steps(trainer, n: int) -> list[float]:
    """Train ``n`` more steps; the seconds of each (the first includes entering fit)."""
    from nin.training.callbacks.base import Callback

    times: list[float] = []

    class Clock(Callback):
        def on_step_end(self, tr, loss):
            times.append(time.perf_counter())

    trainer.callbacks = [Clock()]
    trainer.config = replace(trainer.config, max_steps=trainer.step + n)
    t0 = time.perf_counter()
    trainer.fit()
    return [b - a for a, b in zip([t0] + times, times)]


def instrument(trainer) -> None:
    """Name the project's own stages for the profiler (record_function ranges around them)."""
    from torch.profiler import record_function

    import nin.models.nin as M
    import nin.training.trainer as T

    def wrap(fn, name):
        def inner(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return inner

    trainer.train_loader.transform = wrap(trainer.train_loader.transform, "nin.data.loader")
    trainer.criterion.forward = wrap(trainer.criterion.forward, "nin.loss")
    T._Running.add = wrap(T._Running.add, "nin.running")
    trainer._check = wrap(trainer._check, "nin.check")
    M._space_to_depth = wrap(M._space_to_depth, "nin.s2d")
    # the batch gather (images[idx]) happens in iterate(); count it with the loader
    it = trainer.train_loader.iterate

    def iterate(start=0):
        gen = it(start)
        while True:
            with record_function("nin.data.loader"):
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item

    trainer.train_loader.iterate = iterate

    # per layer: name each fused conv+ReLU's forward and backward after its module (features.block1.0)
    names = {id(m): n.removeprefix("features.") for n, m in trainer.model.named_modules()}
    current = {"name": "?"}
    conv_relu, fwd, bwd = M._conv_relu, M._ConvReLU.forward, M._ConvReLU.backward

    def named_conv_relu(conv, x):
        current["name"] = names.get(id(conv), "?")
        with record_function(f"layer fwd {current['name']}"):
            return conv_relu(conv, x)

    def forward(ctx, *a):
        ctx.layer = current["name"]
        return fwd(ctx, *a)

    def backward(ctx, gy):
        with record_function(f"layer bwd {ctx.layer}"):
            return bwd(ctx, gy)

    M._conv_relu = named_conv_relu
    M._ConvReLU.forward, M._ConvReLU.backward = staticmethod(forward), staticmethod(backward)


def categorize(events) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for e in events:
        node, cat = e, None
        while node is not None:
            cat = CATEGORY.get(node.name)
            if cat is None and node.name.startswith("autograd::engine::evaluate_function: ConvolutionBackward"):
                cat = "conv backward"
            if cat is not None:
                break
            node = node.cpu_parent
        out[cat or f"other: {e.name}"] += e.self_cpu_time_total / 1e3  # ms
    return out


def mode_profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    from nin.analysis.probes import matmul_peak
    from nin.analysis.profile import count_flops
    from nin.models import create_model

    trainer = build(args)
    run_steps(trainer, args.warmup)
    timed = run_steps(trainer, args.steps)
    instrument(trainer)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.record_shapes) as prof:
        profiled = run_steps(trainer, args.steps)
    step_s = statistics.median(timed)
    flops = count_flops(create_model("nin_d2l"), (1, 224, 224), train=True)
    peak = matmul_peak(torch.device("cpu"), torch.bfloat16)
    cats = categorize(prof.events())
    total = sum(cats.values())
    steps = len(profiled)
    print(f"step_breakdown ({'before: fixes off' if args.before else 'as committed'}): nin_d2l, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"unprofiled step: median {step_s * 1e3:.0f} ms of {len(timed)} ({args.batch_size / step_s:.1f} img/s, "
          f"MFU {flops * args.batch_size / step_s / peak:.1%} of the bf16 matmul probe {peak / 1e9:,.0f} GFLOP/s); "
          f"profiled steps: median {statistics.median(profiled) * 1e3:.0f} ms")
    print(f"\n{'category':<48}{'ms/step':>9}{'share':>8}")
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        if ms / total < args.min_share:
            continue
        print(f"{cat:<48}{ms / steps:>9.1f}{ms / total:>8.1%}")
    rest = sum(ms for ms in cats.values() if ms / total < args.min_share)
    label = f"(everything under {args.min_share:.1%} each)"
    print(f"{label:<48}{rest / steps:>9.1f}{rest / total:>8.1%}")
    print(f"{'total self time of profiled ops':<48}{total / steps:>9.1f}{1:>8.0%}")
    layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.name.startswith("layer "):
            _, kind, name = e.name.split(" ", 2)
            layers[name][kind == "bwd"] += e.cpu_time_total / 1e3 / steps
    if layers:
        print("\nper layer (fused conv+ReLU; forward: conv with ReLU post-op, s2d copy included for block1.0;"
              " backward: ReLU mask + conv backward)")
        print(f"{'layer':<14}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd GFLOP/s':>17}")
        fl = layer_flops(trainer.model, args.batch_size)
        for name, (f, b) in layers.items():
            rate = fl.get(name, 0) / ((f + b) / 1e3) / 1e9 if f + b else 0
            print(f"{name:<14}{f:>9.1f}{b:>9.1f}{rate:>17,.0f}")
    if args.table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table))


def layer_flops(model, batch: int) -> dict[str, float]:
    """Training FLOPs per step of each conv: forward, weight gradient and (but for the first) input gradient."""
    out = {}
    x = torch.zeros(1, *model.input_size)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    first = True
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            o = shapes[n]
            fwd = 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * o[2] * o[3] * batch
            out[n.removeprefix("features.")] = fwd * (2 if first else 3)
            first = False
    return out


def _verbose_lines(fn) -> list[str]:
    """oneDNN's verbose exec lines while ``fn()`` runs (fd 1 redirected to a file meanwhile)."""
    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return [ln.strip() for ln in log if ln.startswith("onednn_verbose") and ",exec," in ln]


def _one_eval_batch(trainer) -> None:
    from nin.data.loader import DeviceLoader
    from nin.training.trainer import evaluate

    tl = trainer.train_loader
    b = tl.batch_size
    loader = DeviceLoader(tl.images[:b], tl.labels[:b], b, size=tl.size, channels_last=tl.channels_last)
    evaluate(trainer.eval_model(), loader, autocast=trainer.autocast)


def mode_onednn(args) -> None:
    """One step (after warm-up) with oneDNN's verbose log on fd 1, parsed per primitive."""
    trainer = build(args)
    run_steps(trainer, args.warmup)
    lines = _verbose_lines(lambda: run_steps(trainer, 1))
    convs: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, set()])
    reorders = [0, 0.0]
    impls = set()
    for ln in lines:
        f = ln.split(",")
        # onednn_verbose,v1,primitive,exec,cpu,<kind>,<impl>,<prop>,<mem>,<attr>,<aux>,<desc>,<ms>
        kind, impl, prop, desc, ms = f[5], f[6], f[7], f[-2], float(f[-1])
        if kind == "reorder":
            reorders[0] += 1
            reorders[1] += ms
            continue
        impls.add(impl)
        c = convs[(desc, prop)]
        c[0] += 1
        c[1] += ms
        c[2].add(impl)
    infer = _verbose_lines(lambda: _one_eval_batch(trainer))
    ir = [float(ln.split(",")[-1]) for ln in infer if ",reorder," in ln]
    ic = [float(ln.split(",")[-1]) for ln in infer if ",convolution," in ln]
    print(f"inference, one evaluate() batch of {args.batch_size}: {len(ir)} reorders ({sum(ir):.1f} ms), "
          f"{len(ic)} convolutions ({sum(ic):.1f} ms)")
    print(f"oneDNN primitives of one training step ({len(lines)} executions)")
    print(f"reorders: {reorders[0]} per step, {reorders[1]:.1f} ms in all")
    print(f"implementations: {', '.join(sorted(impls))}")
    print(f"\n{'problem':<64}{'pass':<18}{'calls':>6}{'ms':>9}{'GFLOP/s':>9}")
    for (desc, prop), (n, ms, _impls) in sorted(convs.items(), key=lambda kv: -kv[1][1]):
        m = re.search(r"mb(\d+)_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\S*?iw\d+ow(\d+)kw(\d+)", desc)
        rate = ""
        if m:
            mb, ic, oc, oh, kh, ow, kw = map(int, m.groups())
            flop = 2 * mb * ic * oc * oh * ow * kh * kw * n
            rate = f"{flop / (ms / 1e3) / 1e9:,.0f}"
        print(f"{desc[:63]:<64}{prop:<18}{n:>6}{ms:>9.1f}{rate:>9}")


def mode_ab(args) -> None:
    """Interleaved in one process: 2 steps of each variant per round (the first absorbs the switch); the
    second step's time is kept. Medians over rounds, and medians of the per-round ratios to the first variant."""
    variants = {"module by module": (False, False), "fused conv+ReLU": (True, False),
                "fused + space-to-depth": (True, True)}
    trainer = build(args)
    run_steps(trainer, args.warmup)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, (fused, s2d) in variants.items():
            set_switches(fused, s2d)
            times[k].append(run_steps(trainer, 2)[1])
    set_switches(True, True)
    base = times["module by module"]
    print(f"A/B, {args.rounds} rounds, interleaved, batch {args.batch_size}")
    for k, v in times.items():
        ratio = statistics.median(a / b for a, b in zip(base, v))
        med = statistics.median(v)
        print(f"{k:<26} median step {med * 1e3:7.1f} ms  {args.batch_size / med:6.1f} img/s  "
              f"speed-up {ratio:.3f}x (median of per-round ratios)")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mode_peak(args) -> None:
    """The bench's probe (nin.analysis.probes.matmul_peak) against longer probes and the model's own convolutions."""
    import torch.nn.functional as F

    from nin.analysis.probes import matmul_peak
    from nin.training.memory import _FreedMemoryKept

    probes = [matmul_peak(torch.device("cpu"), torch.bfloat16) for _ in range(args.rounds)]
    cases = {}
    for n in (2048, 4096, 8192):
        a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
        c = torch.empty(n, n, dtype=torch.bfloat16)
        cases[f"matmul {n}^3, out="] = ((lambda a=a, b=b, c=c: torch.mm(a, b, out=c)), 2 * n**3)
        cases[f"matmul {n}^3, fresh output"] = ((lambda a=a, b=b: a @ b), 2 * n**3)

    def conv(cin, cout, k, h, p, batch=128):
        x = torch.randn(batch, cin, h, h).bfloat16().to(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, k, k).bfloat16().to(memory_format=torch.channels_last)
        ho = h + 2 * p - k + 1
        return (lambda: F.conv2d(x, w, padding=p)), 2 * batch * cin * cout * k * k * ho * ho

    cases["conv 5x5 96->256 @26 (block2)"] = conv(96, 256, 5, 26, 2)
    cases["conv 3x3 256->384 @12 (block3)"] = conv(256, 384, 3, 12, 1)
    cases["conv 3x3 16->96 @56 (block1, s2d)"] = conv(16, 96, 3, 56, 0)
    cases["conv 1x1 96->96 @54 (block1)"] = conv(96, 96, 1, 54, 0)
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for fn, _ in cases.values():
        fn()

    def timed(group):
        for _ in range(args.rounds):
            for k in group:
                fn, flop = cases[k]
                t0 = time.perf_counter()
                fn()
                rates[k].append(flop / (time.perf_counter() - t0) / 1e9)

    timed([k for k in cases if k.startswith("matmul")])
    with _FreedMemoryKept(torch.device("cpu")):  # convs as in a training step: outputs reuse freed memory
        timed([k for k in cases if k.startswith("conv")])
    src = torch.ones(2**29, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_seconds(lambda: dst.copy_(src)) for _ in range(5))
    print(f"memory: a 1 GiB bf16 copy moves {2 * 2**30 / best / 1e9:.1f} GB/s (read + write, best of 5)")
    print(f"nin.analysis.probes.matmul_peak (bf16), {args.rounds} calls: "
          + ", ".join(f"{p / 1e9:,.0f}" for p in probes) + " GFLOP/s")
    print(f"{'product':<36}{'best':>9}{'median':>9}  GFLOP/s over {args.rounds} interleaved runs")
    for k, v in rates.items():
        print(f"{k:<36}{max(v):>9,.0f}{statistics.median(v):>9,.0f}")


def mode_seed(args) -> None:
    """The seed's way alone in a fresh process (nin.analysis.bench.baseline_case, as ``nin bench --baseline`` runs it,
    but with no fast case before it in the process): is the bench's figure for it affected by what ran first?"""
    from nin.analysis.bench import BenchConfig, baseline_case, bench_data
    from nin.analysis.probes import matmul_peak
    from nin.analysis.profile import count_flops
    from nin.models import create_model

    cfg = BenchConfig(steps=args.steps, repeats=args.rounds)
    device = torch.device("cpu")
    m = create_model("nin_d2l")
    flops = (count_flops(m, (1, 224, 224)), count_flops(m, (1, 224, 224), train=True))
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    r = baseline_case(cfg, bench_data(cfg, 1, device), device, flops, peaks, args.steps)
    print(f"seed's way alone: train {r.train_img_s:.1f} img/s, inference {r.infer_img_s:.1f} img/s "
          f"(medians of {args.rounds} blocks of {args.steps} steps/batches)")


def mode_steps(args) -> None:
    """Median step time of ``--steps`` steps after ``--warmup``, with this process's page faults and
    system time over them (resource.getrusage)."""
    import resource

    from nin.training.callbacks.base import Callback

    trainer = build(args)
    run_steps(trainer, args.warmup)
    marks = []

    class Usage(Callback):
        def on_step_end(self, tr, loss):
            marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)))

    trainer.callbacks = [Usage()]
    trainer.config = replace(trainer.config, max_steps=trainer.step + args.steps)
    trainer.fit()  # steps 2.. of this fit: the first pays for entering fit (and re-faulting its memory)
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    r0, r1 = marks[0][1], marks[-1][1]
    n = len(times)
    names = ("NIN_KEEP_FREED_MEMORY", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "OMP_PROC_BIND", "OMP_PLACES",
             "OMP_WAIT_POLICY")
    env = " ".join(f"{k}={os.environ[k]}" for k in names if k in os.environ)
    med = statistics.median(times)
    print(f"steps [{env or 'defaults'}]: median {med * 1e3:.0f} ms ({args.batch_size / med:.1f} img/s) of "
          f"{len(times)}; per step {(r1.ru_minflt - r0.ru_minflt) / n:,.0f} page faults, "
          f"{(r1.ru_stime - r0.ru_stime) / n:.2f} s system, {(r1.ru_utime - r0.ru_utime) / n:.2f} s user")


def mode_infer(args) -> None:
    """evaluate() over 10 batches of 128 test images (bf16 autocast, eval mode), median of ``--rounds``."""
    from nin.data.loader import DeviceLoader
    from nin.data.sources import load_split
    from nin.models import create_model, init_weights
    from nin.training.trainer import evaluate

    xte, yte = load_split("fashion-mnist", "test", None, False)
    m = init_weights(create_model("nin_d2l"), "xavier").to(memory_format=torch.channels_last).eval()
    n = 10 * args.batch_size
    loader = DeviceLoader(xte[:n], yte[:n], args.batch_size, size=(224, 224), channels_last=True)

    def autocast():
        return torch.autocast("cpu", torch.bfloat16)

    evaluate(m, DeviceLoader(xte[:args.batch_size], yte[:args.batch_size], args.batch_size, size=(224, 224),
                             channels_last=True), autocast=autocast)
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        evaluate(m, loader, autocast=autocast)
        rates.append(n / (time.perf_counter() - t0))
    keep = os.environ.get("NIN_KEEP_FREED_MEMORY", "1") != "0"
    print(f"evaluate [{'memory kept' if keep else 'NIN_KEEP_FREED_MEMORY=0'}]: median {statistics.median(rates):.1f} "
          f"img/s over {args.rounds} calls of {n} images")


def mode_flags(args) -> None:
    """torch.backends.mkldnn.deterministic off/on, interleaved like --mode ab."""
    trainer = build(args)
    run_steps(trainer, args.warmup)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for det in (False, True):
            torch.backends.mkldnn.deterministic = det
            times[det].append(run_steps(trainer, 2)[1])
    torch.backends.mkldnn.deterministic = False
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
    print(f"mkldnn.deterministic off: median {statistics.median(times[False]) * 1e3:.0f} ms, on: "
          f"{statistics.median(times[True]) * 1e3:.0f} ms; speed-up of on {ratio:.3f}x ({args.rounds} rounds)")
    if args.mkldnn_off:
        on = run_steps(trainer, 2)[1]
        torch.backends.mkldnn.enabled = False
        off = run_steps(trainer, 2)[1]
        torch.backends.mkldnn.enabled = True
        print(f"mkldnn.enabled=False: one step {off:.1f} s against {on:.2f} s enabled ({off / on:.0f}x slower)")


def mode_micro(args) -> None:
    """Per-op alternatives, each interleaved with the adopted one, inside the allocator fix (as in a step).
    Times are medians of ``--rounds``; ratios are medians of per-round ratios (>1: the alternative is faster)."""
    import torch.nn.functional as F

    import nin.models.nin as M
    from nin.training.memory import _FreedMemoryKept

    torch.manual_seed(0)
    cl = torch.channels_last

    def report(title, fns):
        res = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                res[k].append(time.perf_counter() - t0)
        first = next(iter(res.values()))
        print(title)
        for k, v in res.items():
            ratio = statistics.median(a / b for a, b in zip(first, v))
            print(f"  {k:<44}{statistics.median(v) * 1e3:8.1f} ms  {ratio:6.2f}x")

    with _FreedMemoryKept(torch.device("cpu")):
        # the first conv (1 -> 96, 11x11 stride 4), forward + weight/bias gradients, ReLU included
        x = torch.randn(128, 1, 224, 224).to(memory_format=cl)
        w = (torch.randn(96, 1, 11, 11) * 0.05).to(memory_format=cl).requires_grad_()
        b = torch.zeros(96).requires_grad_()
        gy = torch.randn(128, 96, 54, 54).bfloat16().to(memory_format=cl)

        def l1(xx, ww, stride, amp=True, g=gy):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                y = F.relu(F.conv2d(xx, ww, b, stride), inplace=True)
            return torch.autograd.grad(y, [w, b], g)

        def s2d():
            xs, ws = M._space_to_depth(x, w.to(torch.bfloat16), 4, torch.bfloat16)
            with torch.autocast("cpu", torch.bfloat16):
                y = F.relu(F.conv2d(xs, ws, b), inplace=True)
            return torch.autograd.grad(y, [w, b], gy)

        report("first conv, fwd + bwd (no input gradient):", {
            "bf16 direct (1 input channel)": lambda: l1(x, w, 4),
            "fp32 direct": lambda: l1(x, w, 4, amp=False, g=gy.float()),
            "bf16, input zero-padded to 4 channels": lambda: l1(torch.cat([x, x.new_zeros(128, 3, 224, 224)], 1)
                                                              .to(memory_format=cl),
                                                              torch.cat([w, w.new_zeros(96, 3, 11, 11)], 1), 4),
            "bf16 space-to-depth, 16 channels 3x3 (adopted)": s2d,
        })
        # the s2d conv with its 16 channels zero-padded to 32
        fns = {}
        for ic in (16, 32):
            xs = torch.randn(128, ic, 56, 56).bfloat16().to(memory_format=cl)
            ws = (torch.randn(96, ic, 3, 3) * 0.1).bfloat16().to(memory_format=cl)
            bs = torch.randn(96).bfloat16()
            fns[f"{ic} channels: fwd (ReLU fused) + weight grad"] = (
                lambda xs=xs, ws=ws, bs=bs: (torch.ops.mkldnn._convolution_pointwise(
                    xs, ws, bs, [0, 0], [1, 1], [1, 1], 1, "relu", [], ""),
                    torch.ops.aten.convolution_backward(gy, xs, ws, [96], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                        [False, True, True])))
        report("space-to-depth conv, 16 (adopted) vs 32 input channels:", fns)
        # 1x1 convs as oneDNN convolutions (adopted) or as matmuls over the NHWC rows
        for c, h in ((96, 54), (256, 26), (384, 12)):
            xc = torch.randn(128, c, h, h).bfloat16().to(memory_format=cl)
            wc = (torch.randn(c, c, 1, 1) * 0.1).bfloat16().to(memory_format=cl)
            bc = torch.randn(c).bfloat16()
            gc = torch.randn(128, c, h, h).bfloat16().to(memory_format=cl)

            def conv(xc=xc, wc=wc, bc=bc, gc=gc, c=c):
                y = torch.ops.mkldnn._convolution_pointwise(xc, wc, bc, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
                gz = torch.ops.aten.threshold_backward(gc, y, 0)
                return torch.ops.aten.convolution_backward(gz, xc, wc, [c], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                           [True, True, True])

            def linear(xc=xc, wc=wc, bc=bc, gc=gc, c=c):
                x2, w2 = xc.permute(0, 2, 3, 1).reshape(-1, c), wc.view(c, c)
                y = torch.ops.mkldnn._linear_pointwise(x2, w2, bc, "relu", [], "")
                gz = torch.ops.aten.threshold_backward(gc.permute(0, 2, 3, 1).reshape(-1, c), y, 0)
                return gz @ w2, gz.t() @ x2, gz.sum(0)

            report(f"1x1 conv {c}->{c} at {h}x{h}, fwd + ReLU mask + bwd:", {
                "oneDNN convolution (adopted)": conv, "oneDNN matmul over NHWC rows": linear})
        # dropout on block3's pooled output
        xd = torch.randn(128, 384, 5, 5).bfloat16().to(memory_format=cl)
        report("dropout p=0.5 on 128x384x5x5 bf16:", {
            "F.dropout (bernoulli_; kept)": lambda: F.dropout(xd, 0.5, True),
            "mask from rand_like (another RNG stream)":
                lambda: xd * (torch.rand_like(xd, dtype=torch.float32) > 0.5) * 2,
        })


def mode_check(args) -> None:
    """Numerics of the fast paths on nin_d2l (eval mode, no dropout; 8 images): fused vs module by module
    (expected bit-identical), and space-to-depth vs the direct bf16 conv, each against an fp32 run."""
    from nin.models import create_model, init_weights

    torch.manual_seed(0)
    m = init_weights(create_model("nin_d2l"), "xavier").to(memory_format=torch.channels_last).eval()
    x = torch.randn(8, 1, 224, 224).to(memory_format=torch.channels_last)

    def run(fused, s2d, amp=True):
        set_switches(fused, s2d)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            out = m(x)
        (out.float() ** 2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref, plain, fused, s2d = run(False, False, amp=False), run(False, False), run(True, False), run(True, True)
    set_switches(True, True)
    same = torch.equal(plain[0], fused[0]) and all(torch.equal(plain[1][n], fused[1][n]) for n in plain[1])
    print(f"fused conv+ReLU vs module by module (bf16): outputs and all gradients bit-identical: {same}")
    print(f"{'parameter':<28}{'bf16 direct vs fp32':>21}{'bf16 s2d vs fp32':>18}  (max |diff| / max |fp32 grad|)")
    for n in list(ref[1])[:6]:
        scale = ref[1][n].abs().max()
        print(f"{n:<28}{float((plain[1][n] - ref[1][n]).abs().max() / scale):>21.4f}"
              f"{float((s2d[1][n] - ref[1][n]).abs().max() / scale):>18.4f}")
    print(f"logits max |diff|: s2d vs direct bf16 {float((s2d[0] - plain[0]).abs().max()):.4g}, direct bf16 vs "
          f"fp32 {float((plain[0].float() - ref[0].float()).abs().max()):.4g}")

    # exact resume on the fused path: 12 bf16 steps straight vs 5 steps, state saved and loaded, 7 more
    import copy

    from nin.data.loader import DeviceLoader
    from nin.data.sources import load_split
    from nin.training.config import TrainConfig
    from nin.training.trainer import Trainer

    xtr, ytr = load_split("fashion-mnist", "train", None, False)

    def make():
        torch.manual_seed(0)
        model = init_weights(create_model("nin_d2l", input_size=(112, 112)), "xavier")
        loader = DeviceLoader(xtr[:256], ytr[:256], 32, shuffle=True, size=(112, 112), channels_last=True)
        return model, TrainConfig(epochs=2, batch_size=32, lr=0.05, amp="bf16", max_steps=12), loader

    model, cfg, loader = make()
    Trainer(model, cfg, loader).fit()
    straight = copy.deepcopy(model.state_dict())
    model, cfg, loader = make()
    first = Trainer(model, replace(cfg, max_steps=5), loader)
    first.fit()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(first.state_dict())
    model, cfg, loader = make()
    model.load_state_dict(weights)
    resumed = Trainer(model, cfg, loader)
    resumed.load_state_dict(state)
    resumed.fit()
    exact = all(torch.equal(straight[k], model.state_dict()[k]) for k in straight)
    print(f"resume on the fused path (nin_d2l 112x112, bf16, 12 steps vs 5 + resume + 7): bit-for-bit: {exact}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("profile", "onednn", "ab", "peak", "seed", "steps", "infer", "flags", "micro",
                                      "check"),
                   default="profile")
    p.add_argument("--before", action="store_true", help="allocator fix and fused blocks off (this process)")
    p.add_argument("--no-keep-memory", action="store_true", help="allocator fix off (NIN_KEEP_FREED_MEMORY=0)")
    p.add_argument("--no-fused", action="store_true", help="fused conv+ReLU (and space-to-depth) off")
    p.add_argument("--steps", type=int, default=4, help="profiled (and separately timed) steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="ab/peak: interleaved rounds")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--min-share", type=float, default=0.003, help="profile: fold categories under this share")
    p.add_argument("--table", type=int, default=0, help="profile: also print torch's table of the top N ops")
    p.add_argument("--record-shapes", action="store_true",
                   help="profile: record input shapes (this slows the profiled steps here; compare the medians)")
    p.add_argument("--mkldnn-off", action="store_true", help="flags: also time one step with mkldnn disabled")
    args = p.parse_args()
    if args.before or args.no_keep_memory:
        os.environ["NIN_KEEP_FREED_MEMORY"] = "0"
    if args.before or args.no_fused:
        set_switches(False, False)
    {"profile": mode_profile, "onednn": mode_onednn, "ab": mode_ab, "peak": mode_peak, "seed": mode_seed,
     "steps": mode_steps, "infer": mode_infer, "flags": mode_flags, "micro": mode_micro,
     "check": mode_check}[args.mode](args)


if __name__ == "__main__":
    main()
