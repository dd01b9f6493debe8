"""``nin models``, ``nin datasets``, ``nin shapes``, ``nin profile``: what models and data there are, and what a
model costs."""

from __future__ import annotations

import argparse
import functools
import json

from nin.cli.options import (
    _add_model_options,
    _checked_input,
    _model_options,
    _path,
    _ranged,
    parse_input_size,
    parse_model_ref,
)
from nin.errors import NinError


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("datasets", help="the data sets, where each was found and whether its checksum matches")
    p.add_argument("--data-dir", type=_path, help="look only in this directory (as NIN_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("shapes", help="print each stage's output shape and parameter count")
    p.add_argument("model")
    p.add_argument("--input", type=parse_input_size, help="input size CxHxW (default: the model's)")
    _add_model_options(p)

    p = sub.add_parser("profile", help="per-layer parameters, MACs and memory, estimated and measured; --compare",
                       description="Per-layer parameters, multiply-accumulates and activation memory, totals, "
                                   "and inference/training memory at a batch size, estimated from shapes and "
                                   "measured by a real training step and a real inference. A MODEL may carry "
                                   "options: nin_d2l:mlp_layers=1,head_width=384.")
    p.add_argument("model", nargs="?", help="registered model, optionally NAME:option=value,...")
    p.add_argument("--compare", nargs="+", metavar="MODEL", help="put these models side by side")
    p.add_argument("--input", type=parse_input_size, help="input size CxHxW or HxW (default: each model's)")
    p.add_argument("--batch", type=_ranged("train.batch_size", int), default=128,
                   help="batch size of the memory figures (default 128)")
    p.add_argument("--device", default="auto", help="where to measure: auto, cpu or cuda[:N]")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="none: float32 (default); bf16 or fp16: 16-bit autocast with float32 weights")
    p.add_argument("--optimizer", choices=("sgd", "momentum"), default="momentum",
                   help="optimizer state: plain SGD (d2l's) or SGD with momentum (the trainer's, default)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="memory format of the measured runs (default: the trainer's, channels_last)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="run a real training step and inference to measure peak memory (default on)")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    _add_model_options(p)



def cmd_models(args: argparse.Namespace) -> int:
    from nin.models import DEFAULT_MODEL
    from nin.models.registry import describe_models

    rows = describe_models(DEFAULT_MODEL)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<14}{'family':<9}{'input':<12}{'params':>12}  description")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(f"{r['name']:<14}{r['family']:<9}{r['input']:<12}{r['params']:>12,}  {r['description']}{mark}")
    print("\noptions (nin shapes/profile/train flags, or NAME:key=value in nin profile):")
    for r in rows:
        print(f"  {r['name']:<12}{', '.join(r['options'])}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from nin.data import status

    rows = status(args.data_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'dataset':<15}{'images':<10}{'classes':>8}  {'found in':<40}checksum")
    for r in rows:
        print(f"{r['name']:<15}{r['shape']:<10}{r['classes']:>8}  {r['found']:<40}{r['checksum']}")
    print("\nfolder:PATH        your images, one sub-folder per class, decoded to the model's channels and size")
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from nin.analysis.shapes import stage_shapes
    from nin.models import create_model

    model = create_model(args.model, **_model_options(args))
    if args.input:
        _, h, w = _checked_input(args.model, model, args.input)
        model = create_model(args.model, **_model_options(args), input_size=(h, w))
    rows = stage_shapes(model, args.model)
    print(f"{args.model}: input {'x'.join(map(str, model.input_size))}")
    print(f"{'stage':<9}{'layer':<19}{'output shape':<16}{'params':>11}")
    for r in rows:
        print(f"{r.name:<9}{r.layer:<19}{'x'.join(map(str, r.shape)):<16}{r.params:>11,}")
    print(f"{'total':<44}{sum(r.params for r in rows):>11,}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from nin.analysis.measure import measure_both
    from nin.analysis.profile import profile_model
    from nin.analysis.report import render, render_compare
    from nin.models import create_model
    from nin.training.runtime import configure_runtime, resolve_device

    refs = ([args.model] if args.model else []) + (args.compare or [])
    if not refs:
        raise NinError("profile: name a MODEL, or several with --compare")
    configure_runtime(None)
    device = resolve_device(args.device)
    common = _model_options(args)
    profiles = []
    for ref in refs:
        name, options = parse_model_ref(ref)
        options = {**common, **options}
        model = create_model(name, **options)
        if args.input:
            _, h, w = _checked_input(name, model, args.input)
            options["input_size"] = (h, w)
            model = create_model(name, **options)
        prof = profile_model(model, name=ref, batch=args.batch, amp=args.amp, optimizer=args.optimizer,
                             device=device.type)
        if args.measure:
            factory = functools.partial(create_model, name, **options)
            prof.measured = measure_both(factory, prof.input_size, args.batch, device, amp=args.amp,
                                         optimizer=args.optimizer, channels_last=args.channels_last)
        profiles.append((ref, prof))
    if args.compare:
        print(render_compare(profiles, args.format), end="")
    else:
        print(render(profiles[0][1], args.format), end="")
    return 0
