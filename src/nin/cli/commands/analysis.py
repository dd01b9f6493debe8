"""``nin bench``, ``nin doctor``: speed on this machine, and the machine itself."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from nin.bounds import MAX_IMAGE_SIDE, Range, flag_type
from nin.cli.options import SPEED, THREADS, _add_speed_options, _path, _ranged
from nin.errors import NinError


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="training/inference speed, latency, memory and MFU; --baseline: vs the seed's way")
    p.add_argument("--model", default="nin_d2l", help="registered model (default nin_d2l)")
    p.add_argument("--size", type=flag_type(Range(1, MAX_IMAGE_SIDE), int), help="input side (default: the model's)")
    p.add_argument("--batch-size", type=_ranged("train.batch_size", int), default=128)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    _add_speed_options(p)
    p.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=flag_type(Range(0, 10_000), int), default=1, help="untimed steps first (default 1)")
    g.add_argument("--steps", type=flag_type(Range(1, 10**6), int),
                   help="steps per timed block (default: about --block-seconds)")
    g.add_argument("--block-seconds", type=flag_type(Range(0, 3600, lo_open=True)), default=2.0)
    g.add_argument("--repeats", type=flag_type(Range(1, 1000), int), default=3,
                   help="timed blocks; the median is reported")
    g.add_argument("--latency-runs", type=flag_type(Range(1, 100_000), int), default=20)
    g.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                   help="auto: real Fashion-MNIST when found locally, else synthetic uint8 images")
    g.add_argument("--data-dir", type=_path, help="directory holding the data files")
    g = p.add_argument_group("what to run")
    g.add_argument("--baseline", action="store_true",
                   help="also time the seed's way (fp32, NCHW, PIL resize in DataLoader workers) and print ratios")
    g.add_argument("--workers", type=flag_type(Range(0, 256), int), default=4,
                   help="DataLoader workers of the baseline (default 4)")
    g.add_argument("--ablate", nargs="?", const="all", metavar="SWITCHES",
                   help="also time the fast path with each speed switch flipped: all (default) or a comma list "
                        "of channels_last, fused, fold_bn, compile, amp")
    g.add_argument("--time-to-accuracy", action="store_true",
                   help="train a recipe on real Fashion-MNIST; print when each --targets accuracy is first reached")
    g.add_argument("--preset", default="default", help="recipe for --time-to-accuracy (default: default)")
    g.add_argument("--epochs", type=_ranged("train.epochs", int),
                   help="epochs for --time-to-accuracy (default: the preset's)")
    g.add_argument("--targets", default="0.91,0.93", help="test accuracies for --time-to-accuracy")
    g.add_argument("--subset", type=_ranged("data.subset", int), metavar="N",
                   help="--time-to-accuracy on a seeded N of the training images (a quick check of the command; "
                        "its times are not the recipe's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    p.add_argument("--record", type=_path, metavar="DIR",
                   help="also keep the results, the command and this machine's fingerprint (nin doctor) as a new "
                        "JSON file in DIR, e.g. benchmarks/results (docs/performance.md is rendered from those)")


    p.set_defaults(_parser=p)  # cmd_bench tells given flags from defaults by it
    p = sub.add_parser("doctor", help="this machine, what nin will do on it and why, and how fast it can go",
                       description="The CPU and its features, memory, software versions and GPUs; the machine's "
                                   "kind; the speed settings nin train picks on the device, each with its reason; "
                                   "a few seconds of matmul probes; and the data sets found.")
    p.add_argument("--device", default="auto", help="the device to look at: auto (default), cpu or cuda[:N]")
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip the matmul probes")
    p.add_argument("--json", action="store_true", help="one JSON document with the same sections")



def _targets(s: str) -> list[float]:
    try:
        values = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise NinError(f"--targets must be accuracies in (0, 1] separated by commas, got {s!r}")
    return values


_SPEED_ONLY = ("model", "size", "batch_size", "warmup", "steps", "block_seconds", "repeats", "latency_runs", "data",
               "baseline", "workers", "ablate")


_TTA_ONLY = ("preset", "epochs", "targets", "subset")


def _command_line(args: argparse.Namespace, defaults: dict) -> str:
    """The command that repeats ``args``: its name and every flag whose value differs from the default."""
    words = ["nin", args.command]
    for k, v in vars(args).items():
        if k == "command" or k.startswith("_") or v == defaults.get(k) or v is None:
            continue
        flag = f"--{k.replace('_', '-')}"
        words += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    from nin.analysis.bench import BenchConfig, run_bench, time_to_accuracy
    from nin.analysis.records import make_record, write_record
    from nin.training.config import override, preset
    from nin.training.runtime import configure_runtime

    defaults = vars(args._parser.parse_args([]))  # what each flag is when not given
    changed = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k in _SPEED_ONLY + _TTA_ONLY and
               v != defaults[k] and (k in _SPEED_ONLY) == bool(args.time_to_accuracy)]
    if changed:
        raise NinError(f"bench: {changed[0]} is for " + ("the speed benchmark, not --time-to-accuracy"
                                                         if args.time_to_accuracy else "--time-to-accuracy"))
    if args.record and os.path.exists(args.record) and not os.path.isdir(args.record):
        raise NinError(f"--record {args.record}: not a directory")  # before minutes of measuring, not after
    configure_runtime(args.threads)
    report = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else \
        (lambda line: print(line, flush=True))
    if args.time_to_accuracy:
        targets = _targets(args.targets)
        given = {"train.epochs": args.epochs, "data.subset": args.subset, "device": args.device,
                 "data.data_dir": args.data_dir, **{f"train.{f}": getattr(args, f) for f in SPEED}}
        cfg = override(preset(args.preset), {k: v for k, v in given.items() if v is not None})
        result = {"preset": args.preset, **time_to_accuracy(cfg, targets, report)}
    else:
        kw = {f: getattr(args, f) for f in ("model", "size", "batch_size", "device", "amp", "channels_last",
                                            "compile", "fused", "fold_bn", "warmup", "steps", "block_seconds",
                                            "repeats", "latency_runs", "data", "data_dir", "workers")}
        kw = {k: v for k, v in kw.items() if v is not None}
        ablate = True if args.ablate == "all" else [a.strip() for a in (args.ablate or "").split(",") if a.strip()]
        result = run_bench(BenchConfig(**kw), baseline=args.baseline, ablate=ablate, report=report)
    rec = make_record(result, "time-to-accuracy" if args.time_to_accuracy else "speed",
                      _command_line(args, defaults))
    if args.record:
        report(f"record: {write_record(rec, args.record)}")
    if args.json:
        print(json.dumps({**result, "machine": rec["machine"]}, indent=1))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nin.analysis.doctor import collect
    from nin.analysis.doctor_report import render

    report = collect(args.device, measure=args.measure)
    print(json.dumps(report, indent=1) if args.json else render(report), end="\n" if args.json else "")
    return 0
