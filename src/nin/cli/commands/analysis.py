"""``nin bench``, ``nin doctor``: speed on this machine, and the machine itself."""

from __future__ import annotations

import argparse
import json
import sys

from nin.analysis.bench import BenchConfig
from nin.analysis.bench_command import TimeToAccuracy
from nin.bounds import THREADS, flag_type
from nin.cli.options import _path, add_settings, command_line, flagged, settings_given
from nin.training.config import SPEED, TrainConfig


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="training/inference speed, latency, memory and MFU; --baseline: vs the seed's way")
    # The settings' flags come from the fields of BenchConfig, its TrainConfig's speed switches and TimeToAccuracy.
    add_settings(p, BenchConfig, "bench", ("model", "size", "batch_size", "device"))
    add_settings(p, TrainConfig, "bench.train", SPEED)
    p.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    g = p.add_argument_group("timing")
    add_settings(g, BenchConfig, "bench", ("warmup", "steps", "block_seconds", "repeats", "latency_runs", "data",
                                           "data_dir"))
    g = p.add_argument_group("what to run")
    g.add_argument("--baseline", action="store_true",
                   help="also time the seed's way (fp32, NCHW, PIL resize in DataLoader workers) and print ratios")
    add_settings(g, BenchConfig, "bench", ("workers",))
    g.add_argument("--ablate", nargs="?", const="all", metavar="SWITCHES",
                   help="also time the fast path with each speed switch flipped: all (default) or a comma list "
                        "of channels_last, fused, fold_bn, compile, amp")
    g.add_argument("--time-to-accuracy", action="store_true",
                   help="train a recipe on real Fashion-MNIST; print when each --targets accuracy is first reached")
    add_settings(g, TimeToAccuracy, "tta", flagged(TimeToAccuracy))
    p.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    p.add_argument("--record", type=_path, metavar="DIR",
                   help="also keep the results, the command and this machine's fingerprint (nin doctor) as a new "
                        "JSON file in DIR, e.g. benchmarks/results (docs/performance.md is rendered from those)")

    p = sub.add_parser("doctor", help="this machine, what nin will do on it and why, and how fast it can go",
                       description="The CPU and its features, memory, software versions and GPUs; the machine's "
                                   "kind; the speed settings nin train picks on the device, each with its reason; "
                                   "a few seconds of matmul probes; and the data sets found.")
    p.add_argument("--device", default="auto", help="the device to look at: auto (default), cpu or cuda[:N]")
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip the matmul probes")
    p.add_argument("--json", action="store_true", help="one JSON document with the same sections")



def cmd_bench(args: argparse.Namespace) -> int:
    from nin.analysis.bench_command import bench_command

    report = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else \
        (lambda line: print(line, flush=True))
    result = bench_command(settings_given(args), "time-to-accuracy" if args.time_to_accuracy else "speed",
                           baseline=args.baseline, ablate=args.ablate, threads=args.threads, record=args.record,
                           command=command_line(args), report=report)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nin.analysis.doctor import collect
    from nin.analysis.doctor_report import render

    report = collect(args.device, measure=args.measure)
    print(json.dumps(report, indent=1) if args.json else render(report), end="\n" if args.json else "")
    return 0
