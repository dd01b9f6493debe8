"""The ``nin`` command: models, datasets, shapes, profile, train, study, tune, evaluate, predict, cam, export,
bench, doctor.

User errors (bad flags, missing or corrupt files) print one line,
``nin: error: ...``, and exit with status 2; nothing prints a traceback for them.
A failure of the operating system that no command anticipated (a full disk, a
read-only file system) or running out of memory is one such line too, with
status 1. A command that fails leaves no half-written output behind, and no new
folder that holds nothing worth keeping.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from nin.bounds import MAX_IMAGE_SIDE, Range, flag_type, range_of
from nin.errors import NinError

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the operating system refused (a full disk), or memory ran out


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error."""

    def error(self, message: str):  # argparse API
        sub = self.prog.split()[1:]
        raise NinError(f"{sub[0]}: {message}" if sub else message)


THREADS = Range(1, 4096)
MAX_PIXELS_HELP = ("refuse images of more than N pixels before decoding them (default 67,108,864: a 64-megapixel "
                   "photo); raise it for larger images")
CAM_GRID = Range(1, 256)  # test images in one CAM figure: 32 rows of 8


_DECLARED_IN = {"train": ("nin.training.config", "TrainConfig"), "data": ("nin.data", "DataConfig"),
                "run": ("nin.training.config", "RunConfig"), "checkpoint": ("nin.training.config", "CheckpointConfig"),
                "model": ("nin.models.specs", None)}


def _ranged(where: str, kind: type = float):
    """An argparse type for the range declared with a setting: ``"train.lr"`` (a field of the train config,
    likewise data, run and checkpoint), or ``"model.WIDTH"`` (a :class:`~nin.bounds.Range` of nin.models).
    The module is imported when the flag is used, so building the parser imports no torch."""
    section, _, name = where.partition(".")

    def parse(text: str):
        import importlib

        module, config = _DECLARED_IN[section]
        obj = importlib.import_module(module)
        r = range_of(getattr(obj, config), name) if config else getattr(obj, name)
        return flag_type(r, kind)(text)

    parse.__name__ = kind.__name__
    return parse


def _path(text: str) -> str:
    """A file or folder name as given: not empty, no NUL byte (no file system takes one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file or folder name, got an empty one")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a file name cannot hold a NUL byte, got {text!r}")
    return text


def _fractions(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.5,0.75, got {s!r}") from None


def parse_input_size(s: str) -> tuple[int, int, int]:
    """``"1x224x224"`` -> (1, 224, 224); ``"32x32"`` keeps the model's channel count (0 here)."""
    parts = s.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (2, 3) or any(d < 1 for d in dims) or any(d > MAX_IMAGE_SIDE for d in dims[-2:]) \
            or (len(dims) == 3 and dims[0] > 256):
        raise NinError(f"--input must look like CxHxW or HxW, with at most 256 channels and sides from 1 to "
                       f"{MAX_IMAGE_SIDE}, got {s[:40]!r}")
    return (0, *dims) if len(dims) == 2 else tuple(dims)  # type: ignore[return-value]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options")
    g.add_argument("--num-classes", type=_ranged("model.NUM_CLASSES", int), help="output classes")
    g.add_argument("--in-channels", type=_ranged("model.IN_CHANNELS", int), help="input channels")
    g.add_argument("--mlp-layers", type=int, choices=range(4), metavar="{0,1,2,3}",
                   help="1x1 convs per block (the seed's ablation; 2 is NiN's)")
    g.add_argument("--width", type=_ranged("model.WIDTH"), help="channel width multiplier")
    g.add_argument("--head-width", type=_ranged("model.HEAD_WIDTH", int),
                   help="NiN: width of the classifier block's convs before the last (a gradual reduction)")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, help="BatchNorm after each conv")
    g.add_argument("--dropout", type=_ranged("model.DROPOUT"),
                   help="drop probability of every dropout stage (NiN: a model without "
                        "any, like nin28, gets one after each pooling stage)")
    g.add_argument("--head", choices=("gap", "fc"),
                   help="NiN: global average pooling (default) or a fully connected layer over the class maps")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=_path, help="checkpoint directory or run directory (its latest checkpoint)")


def _add_speed_options(g) -> None:
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"),
                   help="mixed precision; auto (default): bf16 where the device runs it natively (GPUs of compute "
                        "capability 8.0+, CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older "
                        "GPUs, else none (fp32); `nin doctor` says what it picks here and why")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory format (default on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for CUDA, off on CPUs)")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, help="fused optimizer step (default on)")
    g.add_argument("--fold-bn", action=argparse.BooleanOptionalAction,
                   help="evaluate with BatchNorm folded into the convolutions (default on)")


def _model_options(args: argparse.Namespace) -> dict:
    keys = ("num_classes", "in_channels", "mlp_layers", "width", "head_width", "batch_norm", "dropout", "head")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _option_value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    if s.isidentifier():  # a word, e.g. head=fc; the model checks it
        return s
    raise NinError(f"option value {s!r} is not a number, true, false or a word")


def parse_model_ref(ref: str) -> tuple[str, dict]:
    """``"nin_d2l:mlp_layers=1,width=0.5"`` -> ``("nin_d2l", {"mlp_layers": 1, "width": 0.5})``."""
    name, _, rest = ref.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise NinError(f"model options must look like NAME:key=value,key=value, got {ref!r}")
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return name.strip(), options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nin", description="Network-in-Network image classifiers.")
    parser.add_argument("--version", action="version", version=f"nin {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

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

    p = sub.add_parser("train", help="train a model (default: nin28 on Fashion-MNIST)")
    p.add_argument("--preset", help="recipe to start from: default (nin28, fast), d2l (the seed's recipe) or "
                                    "nin-cifar10 (the paper's CIFAR-10 network and recipe)")
    p.add_argument("--config", type=_path, metavar="FILE",
                   help="settings from a TOML, YAML or JSON file (a run's config.json "
                        "repeats that run); flags given here override it")
    p.add_argument("--model", help="registered model name (see `nin models`)")
    _add_model_options(p)
    p.add_argument("--init", choices=("xavier", "kaiming", "default"), help="weight initialization")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--data", dest="dataset", type=_path,
                   help="fashion-mnist, mnist, cifar10, cifar100, or folder:PATH (one sub-folder per class)")
    g.add_argument("--data-dir", type=_path, help="directory holding the data files, the only place looked (also "
                                                  "NIN_DATA_DIR); it must exist")
    g.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download; fail if the files are not found")
    g.add_argument("--no-checksum", dest="verify", action="store_false", default=None,
                   help="accept files whose checksum differs from the published one (shapes and labels are "
                        "still checked)")
    g.add_argument("--test-dir", type=_path, help="folder data: a test folder with the same class sub-folders")
    g.add_argument("--test-fraction", type=_ranged("data.test_fraction"),
                   help="folder data without --test-dir: seeded share of each class held out (default 0.2)")
    g.add_argument("--max-pixels", type=_ranged("data.max_pixels", int), metavar="N",
                   help=MAX_PIXELS_HELP)
    g.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true", default=None,
                   help="folder data: leave out files that cannot be decoded (they are listed) instead of failing")
    g.add_argument("--subset", type=_ranged("data.subset", int), help="train on a seeded random subset of N images")
    g.add_argument("--test-subset", type=_ranged("data.test_subset", int),
                   help="evaluate on a seeded random subset of N images")
    g.add_argument("--holdout", type=_ranged("data.holdout", int),
                   help="evaluate on N training images held out (the same N for every seed) instead of the test "
                        "split: a validation set for choosing settings")
    g.add_argument("--resize", type=_ranged("data.resize", int), help="input resolution (default: the model's)")
    g.add_argument("--crop-padding", type=_ranged("data.crop_padding", int),
                   help="random translation of up to N pixels")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="normalize by training mean/std")
    g.add_argument("--whiten", action=argparse.BooleanOptionalAction,
                   help="the paper's global contrast normalization and ZCA whitening, fitted on the training set")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_ranged("train.epochs", int))
    g.add_argument("--batch-size", type=_ranged("train.batch_size", int))
    g.add_argument("--lr", type=_ranged("train.lr"), help="peak learning rate")
    g.add_argument("--momentum", type=_ranged("train.momentum"))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=_ranged("train.weight_decay"))
    g.add_argument("--schedule", choices=("constant", "cosine", "onecycle", "step"))
    g.add_argument("--warmup", type=_ranged("train.warmup"), help="fraction of steps spent warming up")
    g.add_argument("--milestones", type=_fractions, help="step schedule: fractions of the run where the lr drops, "
                                                         "e.g. 0.5,0.75")
    g.add_argument("--gamma", type=_ranged("train.gamma"),
                   help="step schedule: factor applied at each milestone (default 0.1)")
    g.add_argument("--label-smoothing", type=_ranged("train.label_smoothing"))
    g.add_argument("--max-steps", type=_ranged("train.max_steps", int),
                   help="stop after N optimizer steps (smoke runs)")
    g.add_argument("--on-diverge", choices=("stop", "rollback"),
                   help="a NaN/inf loss: stop (default), or roll back to the epoch's start with a lower lr")
    g.add_argument("--rollback-factor", type=_ranged("train.rollback_factor"),
                   help="rollback: multiply the lr by this (default 0.5)")
    g.add_argument("--max-rollbacks", type=_ranged("train.max_rollbacks", int),
                   help="rollback: give up after N (default 3)")
    g = p.add_argument_group("speed")
    _add_speed_options(g)
    g.add_argument("--eval-batch-size", type=_ranged("train.eval_batch_size", int))
    g.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    g.add_argument("--seed", type=_ranged("run.seed", int))
    g.add_argument("--out", type=_path, help="run directory (default runs/MODEL-DATE); must not exist yet")
    g.add_argument("--resume", type=_path, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its latest checkpoint")
    g.add_argument("--checkpoint-every", type=_ranged("checkpoint.every_steps", int), metavar="N",
                   help="also save a checkpoint every N steps inside an epoch (default: at each epoch's end only)")
    g.add_argument("--keep-last", type=_ranged("checkpoint.keep_last", int), metavar="N",
                   help="keep the newest N checkpoints (default 3; 0 keeps all); the best one is always kept")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    p = sub.add_parser("study", help="run one of the seed's exercises over seeds; a report with tables and figures",
                       description="Run a named study: its variants, each over several seeds, then a report "
                                   "folder (report.md, curves.png, sweep.png, configs/, study.json). Finished "
                                   "runs are recorded as they end, so running the same command again continues "
                                   "an interrupted study.")
    p.add_argument("name", nargs="?", help="lr, mlp-layers, head, regularization or init (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the studies and their budgets")
    p.add_argument("--budget", choices=("cpu", "full"), default="cpu",
                   help="cpu (default): within about 20 minutes on a 2-core CPU; full: the seed's settings, for a GPU")
    p.add_argument("--seeds", type=flag_type(Range(1, 1000), int), help="seeds per variant (default: the budget's, 3)")
    p.add_argument("--epochs", type=_ranged("train.epochs", int), help="override the budget's epochs")
    p.add_argument("--subset", type=_ranged("data.subset", int), help="override the budget's training images")
    p.add_argument("--data-dir", type=_path, help="directory holding the data files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    p.add_argument("--on-diverge", choices=("stop", "rollback"), default="stop",
                   help="stop (default): a diverged run is recorded as such; rollback: retry it at a lower lr")
    p.add_argument("--out", type=_path,
                   help="report folder (default runs/study-NAME-BUDGET); an existing one is continued")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the recorded runs")

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

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy and a confusion matrix")
    _add_checkpoint(p)
    p.add_argument("--data-dir", type=_path, help="directory holding the data files")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_ranged("train.batch_size", int), default=1000)
    p.add_argument("--out", type=_path, help="folder to write confusion.png and evaluation.json in (default: the "
                                             "checkpoint's); existing ones are never replaced unless --force")
    p.add_argument("--force", action="store_true", help="replace confusion.png and evaluation.json if they exist")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

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

    p = sub.add_parser("tune", help="hyperparameter search with Optuna, scored on held-out training images",
                       description="Search learning rate, batch size, weight decay, schedule and epochs with "
                                   "Optuna (seeded TPE, median pruning). Trials are scored on images held out from "
                                   "the training split, never on the test set, and kept in an Optuna storage "
                                   "(OUT/tune.db); the best configuration is written to OUT/best.yaml for "
                                   "nin train --config.")
    p.add_argument("--trials", type=flag_type(Range(1, 100_000), int), default=20, metavar="N",
                   help="trials to add, over all workers (default 20)")
    p.add_argument("--workers", type=flag_type(Range(1, 256), int), default=1, metavar="N",
                   help="worker processes on this machine sharing the study and the cores (default 1)")
    p.add_argument("--preset", help="recipe the trials start from (default: the config file's, else default)")
    p.add_argument("--config", type=_path, metavar="FILE",
                   help="base settings from a TOML, YAML or JSON file (over --preset)")
    p.add_argument("--model", help="registered model name (see `nin models`)")
    p.add_argument("--dataset", "--data", dest="dataset", type=_path, help="as for nin train (default: the preset's)")
    p.add_argument("--data-dir", type=_path, help="directory holding the data files (also NIN_DATA_DIR)")
    p.add_argument("--holdout", type=_ranged("data.holdout", int), metavar="N",
                   help="validation images held out from the training split (default: 5000, at most a tenth)")
    p.add_argument("--subset", type=_ranged("data.subset", int), metavar="N",
                   help="train each trial on N of the remaining training images")
    p.add_argument("--max-epochs", type=_ranged("train.epochs", int), default=3, metavar="N",
                   help="epochs are searched in 1..N (default 3)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=...",
                   help="change the search: KEY=LOW..HIGH[:log|:linear], KEY=A,B,... or KEY=VALUE for any train "
                        "setting (repeatable)")
    p.add_argument("--startup-trials", type=flag_type(Range(0, 10_000), int), default=5, metavar="N",
                   help="random trials before TPE, and finished trials before pruning (default 5)")
    p.add_argument("--storage", metavar="URL", help="Optuna database URL shared by workers on several machines "
                                                    "(default: sqlite:///OUT/tune.db)")
    p.add_argument("--study-name", default="nin-tune", help="study in the storage; continued if it exists")
    p.add_argument("--threads", type=flag_type(THREADS, int), metavar="N",
                   help="torch threads per worker (default: cores / workers)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default: the preset's)")
    p.add_argument("--seed", type=_ranged("run.seed", int), help="training seed of every trial and seed of the sampler")
    p.add_argument("--out", type=_path,
                   help="directory for tune.db, trials/ and best.yaml (default runs/tune-DATE); an "
                        "existing one is continued")
    p.add_argument("--quiet", action="store_true", help="no line per finished trial")

    p = sub.add_parser("doctor", help="this machine, what nin will do on it and why, and how fast it can go",
                       description="The CPU and its features, memory, software versions and GPUs; the machine's "
                                   "kind; the speed settings nin train picks on the device, each with its reason; "
                                   "a few seconds of matmul probes; and the data sets found.")
    p.add_argument("--device", default="auto", help="the device to look at: auto (default), cpu or cuda[:N]")
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip the matmul probes")
    p.add_argument("--json", action="store_true", help="one JSON document with the same sections")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nin")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from nin.models import DEFAULT_MODEL, create_model, list_models, model_entry

    rows = []
    for name in list_models():
        e = model_entry(name)
        params = sum(p.numel() for p in create_model(name).parameters())
        rows.append({"name": name, "family": e.family, "input": "x".join(map(str, e.input_size)), "params": params,
                     "default": name == DEFAULT_MODEL, "description": e.description, "options": list(e.options)})
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
    import torch

    from nin.models import create_model

    model = create_model(args.model, **_model_options(args))
    c, h, w = model.input_size
    if args.input:
        c, h, w = _checked_input(args.model, model, args.input)
        model = create_model(args.model, **_model_options(args), input_size=(h, w))
    x = torch.rand(1, c, h, w)
    model.eval()
    rows = []
    with torch.no_grad():
        for name, stage in model.named_stages():
            try:
                x = stage(x)
            except RuntimeError as e:
                raise NinError(f"input {c}x{h}x{w} is too small for {args.model}: stage {name} failed "
                               f"({str(e).splitlines()[0]})") from None
            n = sum(p.numel() for p in stage.parameters())
            rows.append((name, type(stage).__name__, "x".join(map(str, x.shape[1:])), n))
    print(f"{args.model}: input {c}x{h}x{w}")
    print(f"{'stage':<9}{'layer':<19}{'output shape':<16}{'params':>11}")
    for name, layer, shape, n in rows:
        print(f"{name:<9}{layer:<19}{shape:<16}{n:>11,}")
    print(f"{'total':<44}{sum(r[3] for r in rows):>11,}")
    return 0


def _checked_input(name: str, model, size: tuple[int, int, int]) -> tuple[int, int, int]:
    ic, h, w = size
    c = ic or model.input_size[0]
    if c != model.input_size[0]:
        raise NinError(f"{name} takes {model.input_size[0]} input channel(s), not {c} "
                       f"(use --in-channels {c} to change the model)")
    return c, h, w


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


_TRAIN_FIELDS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup",
                 "milestones", "gamma", "label_smoothing", "max_steps", "amp", "channels_last", "compile", "fused",
                 "fold_bn", "eval_batch_size", "on_diverge", "rollback_factor", "max_rollbacks")
_DATA_FIELDS = ("dataset", "data_dir", "download", "verify", "subset", "test_subset", "resize", "crop_padding",
                "flip", "normalize", "whiten", "test_dir", "test_fraction", "skip_bad_images", "holdout", "max_pixels")


@contextlib.contextmanager
def _removed_if_failed(path: Path, disposable: tuple[str, ...] = ()):
    """For a folder the command is about to create: if the command fails, remove it again, with the parent
    folders made for it, unless it holds a file worth keeping (one whose name is not in ``disposable``)."""
    from nin.atomic import remove_dirs

    missing = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    from nin.training.run import RunDirBusy

    try:
        yield
    except RunDirBusy:
        raise  # another process owns the folder: it is not this command's to remove
    except BaseException:
        if missing:
            kept = path.is_dir() and any(f.name not in disposable for f in path.rglob("*") if not f.is_dir())
            if not kept:
                shutil.rmtree(path, ignore_errors=True)
                remove_dirs(missing[:0:-1])  # the parents made for it, if nothing else went there
        raise


def _given(args: argparse.Namespace, *names: str) -> list[str]:
    """The flags among ``names`` that were given (their value is not None), spelled as on the command line."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def _check_train_flags(args: argparse.Namespace, cfg) -> None:
    """Refuse flags that the other settings would silently ignore."""
    folder_flags = _given(args, "test_dir", "test_fraction", "skip_bad_images", "max_pixels")
    if folder_flags and not cfg.data.dataset.startswith("folder:"):
        raise NinError(f"{folder_flags[0]} is for image folders (--dataset folder:PATH); {cfg.data.dataset} has "
                       "its own test split")
    if args.test_dir is not None and args.test_fraction is not None:
        raise NinError("--test-fraction splits the training folder when there is no --test-dir; give one of them")
    step_flags = _given(args, "milestones", "gamma")
    if step_flags and cfg.train.schedule != "step":
        raise NinError(f"{step_flags[0]} applies to --schedule step; this run's schedule is {cfg.train.schedule}")
    rollback_flags = _given(args, "rollback_factor", "max_rollbacks")
    if rollback_flags and cfg.train.on_diverge != "rollback":
        raise NinError(f"{rollback_flags[0]} applies to --on-diverge rollback; this run's is {cfg.train.on_diverge}")
    if args.whiten and args.normalize:
        raise NinError("--whiten replaces --normalize; give one of them")


def cmd_train(args: argparse.Namespace) -> int:
    from nin.training import distributed
    from nin.training.runtime import configure_runtime

    configure_runtime(args.threads)
    # Under torchrun: join the other processes, and leave them on every way out (a return, an error,
    # KeyboardInterrupt) with gloo's threads stopped before the interpreter exits (nin.training.distributed).
    with distributed.joined(args.device or "auto"):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from nin.training.config import preset
    from nin.training.distributed import current
    from nin.training.run import default_run_dir, summary_line, train

    if args.config:
        from nin.training.config import load_config

        cfg = load_config(args.config, args.preset)
    else:
        cfg = preset(args.preset or "default")
    given = {k for k, v in vars(args).items() if v is not None and v is not False}
    if args.resume:
        allowed = {"resume", "epochs", "max_steps", "device", "quiet", "threads", "command"}
        extra = sorted(given - allowed)
        if extra:
            raise NinError(f"--resume continues a run with its saved settings; drop --{extra[0].replace('_', '-')} "
                           f"(only --epochs, --max-steps and --device may change)")
    if args.model:
        if args.model != cfg.model.name:
            cfg.model.options = {}
        cfg.model.name = args.model
    cfg.model.options.update(_model_options(args))
    if args.init:
        cfg.model.init = args.init
    for f in _DATA_FIELDS:
        if getattr(args, f) is not None:
            setattr(cfg.data, f, getattr(args, f))
    for f in _TRAIN_FIELDS:
        if getattr(args, f) is not None:
            setattr(cfg.train, f, getattr(args, f))
    if args.checkpoint_every is not None:
        cfg.checkpoint.every_steps = args.checkpoint_every
    if args.keep_last is not None:
        cfg.checkpoint.keep_last = args.keep_last
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device:
        cfg.device = args.device

    main = current().is_main
    if args.resume:
        keep = {"epochs": args.epochs, "max_steps": args.max_steps, "device": args.device}
        result = train(cfg, resume=args.resume, keep=keep, progress=not args.quiet and main, handle_signals=True,
                       log=lambda line: print(f"nin: note: {line}", file=sys.stderr, flush=True))
    else:
        cfg.train.validate()
        _check_train_flags(args, cfg)
        out = Path(args.out) if args.out else default_run_dir(cfg)
        # The main process creates the run directory (nin.training.run.train), so only it removes one a failure
        # left empty.
        with _removed_if_failed(out) if main else contextlib.nullcontext():
            result = train(cfg, out, progress=not args.quiet and main, handle_signals=True)
    if not main:
        return 0
    if result.skipped:
        names = ", ".join(f for f, _ in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else "")
        print(f"nin: warning: skipped {len(result.skipped)} undecodable image(s): {names} "
              f"(listed in {result.run_dir / 'config.json'})", file=sys.stderr)
    if result.signals:
        name = signal.Signals(result.signals[0]).name
        t = result.trainer
        print(f"stopped by {name} at step {t.step} (epoch {t.epoch + 1}, batch {t.pos.batch}); "
              f"checkpoint: {result.checkpoint}\nto continue: nin train --resume {result.run_dir}", file=sys.stderr)
        return 128 + result.signals[0]
    if not result.history:
        print(f"stopped before the end of the first epoch; checkpoint: {result.checkpoint}")
        return 0
    print(summary_line(result.history, result.trainer.device))
    if result.trainer.rollbacks:
        n, scale = len(result.trainer.rollbacks), result.trainer.lr_scale
        print(f"rolled back {n} time(s) after a non-finite loss; the learning rate ended x{scale:g} "
              f"(log: {result.run_dir / 'rollbacks.jsonl'})")
    best = f", best: {result.best}" if result.best is not None and result.best != result.checkpoint else ""
    print(f"run directory: {result.run_dir}  (checkpoint: {result.checkpoint}{best})")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from nin.experiments.study import STUDIES, StudyConfig, get_study, run_study, write_report

    if args.list or not args.name:
        for s in STUDIES.values():
            print(f"{s.name:<15} v{s.version}  {s.title}")
            for b, budget in s.budgets.items():
                print(f"  {b:<5} {len(budget.variants)} variants x {budget.seeds} seeds: {budget.description}")
        return 0
    from nin.training.runtime import configure_runtime

    study = get_study(args.name)
    extra = {"data.data_dir": args.data_dir} if args.data_dir else {}
    sc = StudyConfig(budget=args.budget, seeds=args.seeds, epochs=args.epochs, subset=args.subset,
                     device=args.device, on_diverge=args.on_diverge, extra=extra)
    out = Path(args.out or f"runs/study-{study.name}-{args.budget}")
    command = " ".join(["nin study", study.name, "--budget", args.budget]
                       + [f"--{k.replace('_', '-')} {v}" for k in ("seeds", "epochs", "subset", "data_dir", "device")
                          if (v := getattr(args, k)) not in (None, "auto")]
                       + (["--on-diverge rollback"] if args.on_diverge == "rollback" else []) + ["--out", str(out)])
    with _removed_if_failed(out, disposable=("study.json", "config.json")):
        if not args.report_only:
            configure_runtime(args.threads)
            run_study(study, sc, out, log=lambda line: print(line, flush=True))
        path = write_report(study, sc, out, command)
    print(f"report: {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit 0: every file classified; 1: some files could not be read (each named on stderr); 2: none could."""
    from nin.inference.predict import predict_files
    from nin.inference.trained import load_trained

    trained = load_trained(args.checkpoint, args.device)
    preds, bad = predict_files(trained, args.images, args.top_k, args.batch_size, max_pixels=args.max_pixels)
    if args.json:
        print(json.dumps({"checkpoint": str(trained.path), "model": trained.name,
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
    from nin.inference.cam import cam_panels, check_cam_model, plot_cams
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
        test = _test_split(t, args.data_dir)
        n = min(args.grid, len(test.images))
        rows = cam_panels(t, test.images[:n], 1, test.labels[:n])
        per_row = 8
        flat = [r[0] for r in rows]
        panels = [flat[i:i + per_row] for i in range(0, len(flat), per_row)]
        title = f"{t.name}: top class map of {n} test images"
    else:
        images, good, bad = decode(expand(args.images), *t.stored_shape(), max_pixels=args.max_pixels)
        for f, why in bad:
            print(f"nin: error: {f}: {why}", file=sys.stderr)
        if not good:
            return EXIT_USAGE
        top_k = args.top_k or 3
        panels = cam_panels(t, images, top_k)
        title = f"{t.name}: class maps of the top {min(top_k, len(t.classes))} classes"
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
    result = export(t, args.format, out, sample_inputs(t), args.tolerance, force=args.force)
    print(f"wrote {result.path} ({args.format}, input images [N, {', '.join(map(str, t.model.input_size))}] "
          f"scaled 0-1, output logits [N, {len(t.classes)}])")
    print(f"verified: max |logit difference| {result.max_abs_diff:.2e} against PyTorch on real test images at batch "
          f"sizes {' and '.join(map(str, result.batch_sizes))} (tolerance {args.tolerance:g})")
    return 0


def _test_split(t, data_dir: str | None):
    """The run's test split, checked to have the classes the model was trained on (an image folder may have
    changed since)."""
    test = t.test_split(data_dir)
    if list(test.classes) != list(t.classes):
        raise NinError(f"{test.images_path}: the test images have classes {', '.join(test.classes)}; the model was "
                       f"trained on {', '.join(t.classes)}")
    return test


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nin.atomic import atomic_paths, refuse_existing
    from nin.inference.evaluate import confusion_matrix, predict
    from nin.inference.trained import load_trained
    from nin.plots import plot_confusion

    t = load_trained(args.checkpoint, args.device)
    model, path, name, dataset, classes = t.model, t.path, t.name, t.dataset, t.classes
    out = Path(args.out) if args.out else path
    png, doc = out / "confusion.png", out / "evaluation.json"
    refuse_existing(png, doc, force=args.force)
    test = _test_split(t, args.data_dir)
    preds, truth = predict(model, t.loader(test.images, test.labels, args.batch_size))
    k = len(classes)
    cm = confusion_matrix(preds, truth, k)
    per_class = (cm.diag().double() / cm.sum(1).clamp(min=1)).tolist()
    acc = float(cm.diag().sum()) / max(int(cm.sum()), 1)
    result = {"checkpoint": str(path), "model": name, "dataset": dataset, "examples": int(cm.sum()),
              "test_acc": acc, "per_class_acc": dict(zip(classes, per_class)), "confusion": cm.tolist(),
              "confusion_png": str(png)}
    with atomic_paths(png, doc, exclusive=not args.force) as (tmp_png, tmp_json):  # both files or neither
        plot_confusion(cm, classes, tmp_png, title=f"{name}: test acc {acc:.4f}")
        tmp_json.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{name} on {dataset} test ({int(cm.sum()):,} images): accuracy {acc:.4f}")
    for c, a in zip(classes, per_class):
        print(f"  {c:<14}{a:.4f}")
    print(f"confusion matrix: {png}")
    return 0


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
        if k == "command" or v == defaults.get(k) or v is None:
            continue
        flag = f"--{k.replace('_', '-')}"
        words += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    from nin.analysis.bench import BenchConfig, run_bench, time_to_accuracy
    from nin.analysis.records import make_record, write_record
    from nin.training.config import preset
    from nin.training.runtime import configure_runtime

    defaults = vars(build_parser().parse_args(["bench"]))
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
        cfg = preset(args.preset)
        if args.epochs:
            cfg.train.epochs = args.epochs
        if args.subset:
            cfg.data.subset = args.subset
        cfg.device = args.device
        cfg.data.data_dir = args.data_dir or cfg.data.data_dir
        for f in ("amp", "channels_last", "compile", "fused", "fold_bn"):
            if getattr(args, f) is not None:
                setattr(cfg.train, f, getattr(args, f))
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


def cmd_tune(args: argparse.Namespace) -> int:
    from datetime import datetime

    from nin.experiments.tune import TuneConfig, parse_space, summary, tune
    from nin.training.config import preset

    if args.config:
        from nin.training.config import load_config

        base = load_config(args.config, args.preset)
    else:
        base = preset(args.preset or "default")
    if args.model:
        if args.model != base.model.name:
            base.model.options = {}
        base.model.name = args.model
    for f in ("dataset", "data_dir"):
        if getattr(args, f) is not None:
            setattr(base.data, f, getattr(args, f))
    if args.seed is not None:
        base.seed = args.seed
    if args.device:
        base.device = args.device
    out = Path(args.out) if args.out else Path("runs") / f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    tc = TuneConfig(base=base, out=out, trials=args.trials, workers=args.workers,
                    storage=args.storage, study_name=args.study_name, max_epochs=args.max_epochs,
                    space=parse_space(args.space, args.max_epochs), holdout=args.holdout, subset=args.subset,
                    threads=args.threads, startup_trials=args.startup_trials, quiet=args.quiet)
    with _removed_if_failed(out, disposable=("tune.db",)):
        result = tune(tc)
    print(summary(result))
    return 0 if result.best is not None else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from nin.analysis.doctor import collect, render

    report = collect(args.device, measure=args.measure)
    print(json.dumps(report, indent=1) if args.json else render(report), end="\n" if args.json else "")
    return 0


COMMANDS = {"models": cmd_models, "datasets": cmd_datasets, "shapes": cmd_shapes, "profile": cmd_profile,
            "train": cmd_train, "study": cmd_study, "tune": cmd_tune, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "cam": cmd_cam, "export": cmd_export, "bench": cmd_bench,
            "doctor": cmd_doctor}


def _reports(e: NinError) -> bool:
    """Whether this process prints ``e``: under torchrun every process raises the same error and only the
    main one prints it, unless the error is this process's own (``ProcessError``)."""
    from nin.training.distributed import ProcessError, from_environment

    try:
        return isinstance(e, ProcessError) or from_environment().is_main
    except NinError:
        return True


def _os_error_line(e: OSError) -> str:
    """``PATH: reason`` for an operating-system error (the reason alone when it names no file)."""
    why = e.strerror or str(e) or type(e).__name__
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return ": ".join([*names, why]) if names else why


def _out_of_memory(e: BaseException) -> str | None:
    """What could not be allocated, when ``e`` is an allocation failure (Python's, or a torch allocator's)."""
    if isinstance(e, MemoryError):
        return "out of memory"
    text = str(e)
    m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if m:
        return f"out of memory: tried to allocate {int(m.group(1)) / 2**30:,.1f} GiB"
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return "out of memory: " + text.strip().split(". ")[0]
    return None


STDOUT = "standard output"


class _NamedStdout:
    """The process's standard output, whose write errors name it (a full disk behind it, a closed pipe), so that
    they can be told from the others."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _named(self, e: OSError) -> OSError:
        return type(e)(e.errno, e.strerror, STDOUT) if e.errno else e

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise self._named(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise self._named(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _named_stdout():
    real = sys.stdout is sys.__stdout__ and sys.stdout is not None
    if real:
        sys.stdout = _NamedStdout(sys.stdout)
    try:
        yield
    except OSError as e:
        if real and e.filename == STDOUT:  # what is still buffered would fail again at exit: let it go nowhere
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        raise
    finally:
        if real:
            sys.stdout = sys.__stdout__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _named_stdout():
            args = build_parser().parse_args(argv)
            from nin.training.distributed import from_environment

            if from_environment().distributed and args.command != "train":
                raise NinError(f"nin {args.command} runs in one process; only nin train runs under torchrun")
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a full disk behind stdout shows here, not at interpreter exit
        return code
    except NinError as e:
        if _reports(e):
            print(f"nin: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nin: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the operating system refused something no command anticipated: one line, no traceback
        if e.filename == STDOUT and e.errno == errno.EPIPE:  # the reader went away (nin models | head)
            return EXIT_FAILURE
        print(f"nin: error: {_os_error_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except (MemoryError, RuntimeError) as e:
        why = _out_of_memory(e)
        if why is None:
            raise  # a bug: keep the traceback
        print(f"nin: error: {why}; try a smaller batch, model or input size", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
