"""``nin predict``, ``nin cam``, ``nin export``, ``nin evaluate``: using a trained run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nin.bounds import Range, flag_type
from nin.cli.options import CAM_GRID, EXIT_USAGE, MAX_PIXELS_HELP, _add_checkpoint, _path, _ranged
from nin.errors import NinError


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained model: top-k classes and probabilities",
                       description="Classify PNG/JPEG files (any size and mode) or folders of them. Each image is "
                                   "decoded and normalized exactly as the run's training images were.")
    _add_checkpoint(p)
    p.add_argument("images", nargs="+", type=_path, metavar="IMAGE", help="image files or folders")
    p.add_argument("--max-pixels", type=_ranged("data.max_pixels", int), metavar="N", help=MAX_PIXELS_HELP)
    p.add_argument("--top-k", type=flag_type(Range(1, 100_000), int), default=5,
                   help="classes to show per image (default 5)")
    p.add_argument("--batch-size", type=_ranged("train.batch_size", int), default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON document: predictions and per-file errors")
    _add_tta(p, "the probabilities are averaged over each image and its mirror image")

    p = sub.add_parser("cam", help="class activation maps of a trained NiN over image files or test images (PNG)",
                       description="Overlay each image with the class maps of its top-k classes: channel k of a "
                                   "NiN's last block, whose mean is class k's logit, upsampled to the image.")
    _add_checkpoint(p)
    p.add_argument("images", nargs="*", type=_path, metavar="IMAGE", help="image files or folders (or use --grid)")
    p.add_argument("--top-k", type=flag_type(Range(1, 100_000), int), help="classes per image (default 3)")
    p.add_argument("--max-pixels", type=_ranged("data.max_pixels", int), metavar="N", help=MAX_PIXELS_HELP)
    p.add_argument("--grid", type=flag_type(CAM_GRID, int), metavar="N",
                   help="the first N images of the run's test split, each with its top class and true class")
    p.add_argument("--data-dir", type=_path, help="directory holding the data files (--grid)")
    p.add_argument("--out", type=_path, default="cam.png", help="PNG to write (default cam.png); never replaced "
                                                                "unless --force")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript, verified against PyTorch",
                       description="Export the model with its normalization and BatchNorm folded in: input 0-1 "
                                   "float images [N, C, H, W] at the model's size, any N; output logits. The file "
                                   "is run on real test images and its logits compared with PyTorch's before it "
                                   "is kept.")
    _add_checkpoint(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", type=_path, help="file to write (default: RUN/MODEL-CHECKPOINT.onnx or .pt), and OUT.json; "
                                             "never replaced unless --force")
    p.add_argument("--force", action="store_true", help="replace --out and OUT.json if they exist")
    p.add_argument("--tolerance", type=flag_type(Range(0, 1, lo_open=True)), default=1e-4,
                   help="largest allowed logit difference (default 1e-4)")
    p.add_argument("--data-dir", type=_path, help="directory holding the data files (for the verification images)")
    p.add_argument("--cam", action=argparse.BooleanOptionalAction, default=False,
                   help="a second output, class_maps [N, classes, h, w], so that nin serve can draw class "
                        "activation maps from the file (a NiN with a global-average-pooling head; default: off)")

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy and a confusion matrix")
    _add_checkpoint(p)
    p.add_argument("--data-dir", type=_path, help="directory holding the data files")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_ranged("train.batch_size", int), default=1000)
    p.add_argument("--out", type=_path, help="folder to write confusion.png and evaluation.json in (default: the "
                                             "checkpoint's); existing ones are never replaced unless --force")
    p.add_argument("--force", action="store_true", help="replace confusion.png and evaluation.json (with --tta: "
                                                          "their -tta names) if they exist")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_tta(p, "each test image's predicted probabilities are averaged with its mirror image's; writes "
                "confusion-tta.png and evaluation-tta.json instead")


def _add_tta(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help=f"test-time augmentation by horizontal flips: {what} (default: off)")


def _note_tta(trained, tta: bool) -> None:
    from nin.inference.tta import tta_note

    note = tta_note(trained) if tta else None
    if note:
        print(f"nin: note: {note}", file=sys.stderr, flush=True)


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit 0: every file classified; 1: some files could not be read (each named on stderr); 2: none could."""
    from nin.inference.predict import predict_files
    from nin.inference.trained import load_trained

    trained = load_trained(args.checkpoint, args.device)
    _note_tta(trained, args.tta)
    preds, bad = predict_files(trained, args.images, args.top_k, args.batch_size, max_pixels=args.max_pixels,
                               tta=args.tta)
    if args.json:
        print(json.dumps({"checkpoint": str(trained.path), "model": trained.name, "tta": args.tta,
                          "predictions": [p.to_dict() for p in preds],
                          "errors": [{"file": str(f), "error": why} for f, why in bad]}, indent=1))
    else:
        for p in preds:
            print(f"{p.file}: " + ", ".join(f"{c} {prob:.3f}" for c, prob in p.top))
    for f, why in bad:
        print(f"nin: error: {f}: {why}", file=sys.stderr)
    if not preds:
        return EXIT_USAGE
    return 1 if bad else 0


def cmd_cam(args: argparse.Namespace) -> int:
    from nin.atomic import refuse_existing
    from nin.inference.cam import check_cam_model, grid_panels, image_panels, plot_cams
    from nin.inference.predict import decode, expand
    from nin.inference.trained import load_trained

    if bool(args.images) == bool(args.grid):
        raise NinError("cam: give IMAGE files or --grid N, not both or neither")
    if args.data_dir and not args.grid:
        raise NinError("cam: --data-dir is where --grid finds the test images; IMAGE files do not use it")
    if args.grid and args.top_k is not None:
        raise NinError("cam: --grid shows each image's top class; --top-k is for IMAGE files")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise NinError(f"--out must be a .png file, got {out}")
    refuse_existing(out, force=args.force)  # before minutes of work, not after
    t = load_trained(args.checkpoint, args.device)
    check_cam_model(t.model)
    bad = []
    if args.grid:
        panels, title = grid_panels(t, args.grid, args.data_dir)
    else:
        images, good, bad = decode(expand(args.images), *t.stored_shape(), max_pixels=args.max_pixels)
        for f, why in bad:
            print(f"nin: error: {f}: {why}", file=sys.stderr)
        if not good:
            return EXIT_USAGE
        panels, title = image_panels(t, images, args.top_k or 3)
    plot_cams(panels, out, title, exclusive=not args.force)
    print(f"wrote {out}")
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from nin.inference.export import FORMATS, export, sample_inputs
    from nin.inference.trained import load_trained

    t = load_trained(args.checkpoint, "cpu")
    out = Path(args.out) if args.out else t.path.parent.parent / f"{t.name}-{t.path.name}{FORMATS[args.format]}"
    if args.data_dir:
        t.config.data.data_dir = args.data_dir
    result = export(t, args.format, out, sample_inputs(t), args.tolerance, force=args.force, cam=args.cam)
    maps = f" and class maps [N, {len(t.classes)}, h, w]" if args.cam else ""
    print(f"wrote {result.path} ({args.format}, input images [N, {', '.join(map(str, t.model.input_size))}] "
          f"scaled 0-1, output logits [N, {len(t.classes)}]{maps})")
    print(f"verified: max |logit difference| {result.max_abs_diff:.2e} against PyTorch on real test images at batch "
          f"sizes {' and '.join(map(str, result.batch_sizes))} (tolerance {args.tolerance:g})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nin.atomic import refuse_existing
    from nin.inference.evaluate import evaluate_trained, evaluation_paths, write_evaluation
    from nin.inference.trained import load_trained

    t = load_trained(args.checkpoint, args.device)
    out = Path(args.out) if args.out else t.path
    refuse_existing(*evaluation_paths(out, args.tta), force=args.force)  # before the work
    _note_tta(t, args.tta)
    ev = evaluate_trained(t, args.data_dir, args.batch_size, tta=args.tta)
    png, _ = write_evaluation(ev, out, force=args.force)
    if args.json:
        print(json.dumps({**ev.to_dict(), "confusion_png": str(png)}, indent=1))
        return 0
    tta = " with flip TTA" if ev.tta else ""
    print(f"{ev.model} on {ev.dataset} test ({ev.examples:,} images){tta}: accuracy {ev.accuracy:.4f}")
    for c, a in zip(ev.classes, ev.per_class):
        print(f"  {c:<14}{a:.4f}")
    print(f"confusion matrix: {png}")
    return 0
