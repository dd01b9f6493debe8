"""``nin train``, ``nin study``, ``nin tune``: runs, studies over seeds, and hyperparameter search."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from nin.bounds import THREADS, flag_type
from nin.cli.options import (
    _add_model_options,
    _model_options,
    _path,
    add_settings,
    flag_of,
    flagged,
    given_fields,
    settings_given,
)
from nin.data import DataConfig
from nin.errors import NinError
from nin.experiments.study import StudyConfig
from nin.experiments.tune import TuneConfig
from nin.training.config import SPEED, CheckpointConfig, ModelConfig, RunConfig, TrainConfig

LOGGING = ("tensorboard", "tensorboard_every")  # TrainConfig's logging settings: flags of the run group


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: nin28 on Fashion-MNIST)")
    p.add_argument("--preset", help="recipe to start from: default (nin28, 3 epochs), d2l (the seed's recipe), "
                                    "nin-cifar10 (the paper's CIFAR-10 network and recipe), fast (nin28 for 18 "
                                    "epochs, about 93.9%% in 3.2 minutes on a 2-core bf16 CPU) or best (accuracy "
                                    "first); see docs/accuracy.md")
    p.add_argument("--config", type=_path, metavar="FILE",
                   help="settings from a TOML, YAML or JSON file (a run's config.json "
                        "repeats that run); flags given here override it")
    add_settings(p, ModelConfig, "model", ("name",))
    _add_model_options(p)
    add_settings(p, ModelConfig, "model", ("init",))
    # Every field with help text gets its flag: a new setting is one field (nin.cli.options.flagged).
    add_settings(p.add_argument_group("data"), DataConfig, "data", flagged(DataConfig))
    add_settings(p.add_argument_group("optimization"), TrainConfig, "train",
                 flagged(TrainConfig, exclude=(*SPEED, "eval_batch_size", *LOGGING)))
    g = p.add_argument_group("speed")
    add_settings(g, TrainConfig, "train", (*SPEED, "eval_batch_size"))
    g.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    g = p.add_argument_group("run")
    add_settings(g, RunConfig, "", ("device", "seed"))
    g.add_argument("--out", type=_path, help="run directory (default runs/MODEL-DATE); must not exist yet")
    g.add_argument("--resume", type=_path, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its latest checkpoint")
    add_settings(g, CheckpointConfig, "checkpoint", ("every_steps", "keep_last"))
    add_settings(g, TrainConfig, "train", LOGGING)
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    p = sub.add_parser("study", help="run one of the seed's exercises over seeds; a report with tables and figures",
                       description="Run a named study: its variants, each over several seeds, then a report "
                                   "folder (report.md, curves.png, sweep.png, configs/, study.json). Finished "
                                   "runs are recorded as they end, so running the same command again continues "
                                   "an interrupted study.")
    p.add_argument("name", nargs="?", help="lr, mlp-layers, head, regularization or init (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the studies and their budgets")
    add_settings(p, StudyConfig, "", flagged(StudyConfig), plain=True)
    p.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    p.add_argument("--out", type=_path,
                   help="report folder (default runs/study-NAME-BUDGET); an existing one is continued")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the recorded runs")


    p = sub.add_parser("tune", help="hyperparameter search with Optuna, scored on held-out training images",
                       description="Search learning rate, batch size, weight decay, schedule and epochs with "
                                   "Optuna (seeded TPE, median pruning). Trials are scored on images held out from "
                                   "the training split, never on the test set, and kept in an Optuna storage "
                                   "(OUT/tune.db); the best configuration is written to OUT/best.yaml for "
                                   "nin train --config.")
    p.add_argument("--preset", help="recipe the trials start from (default: the config file's, else default)")
    p.add_argument("--config", type=_path, metavar="FILE",
                   help="base settings from a TOML, YAML or JSON file (over --preset)")
    add_settings(p, ModelConfig, "model", ("name",))
    add_settings(p, DataConfig, "data", ("dataset", "data_dir"))
    add_settings(p, RunConfig, "", ("device", "seed"))  # the seed: every trial's, and the sampler's
    g = p.add_argument_group("tuning")
    add_settings(g, TuneConfig, "", flagged(TuneConfig), plain=True)
    g.add_argument("--space", action="append", default=[], metavar="KEY=...",
                   help="change the search: KEY=LOW..HIGH[:log|:linear], KEY=A,B,... or KEY=VALUE for any train "
                        "setting (repeatable)")



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


def _check_train_flags(changes: dict, cfg) -> None:
    """Refuse flags that the other settings would silently ignore (``changes``: the settings the flags set)."""
    def given(*paths: str) -> list[str]:
        return [flag_of(p) for p in paths if p in changes]

    folder_flags = given("data.test_dir", "data.test_fraction", "data.skip_bad_images", "data.max_pixels")
    if folder_flags and not cfg.data.dataset.startswith("folder:"):
        raise NinError(f"{folder_flags[0]} is for image folders (--dataset folder:PATH); {cfg.data.dataset} has "
                       "its own test split")
    if "data.test_dir" in changes and "data.test_fraction" in changes:
        raise NinError("--test-fraction splits the training folder when there is no --test-dir; give one of them")
    step_flags = given("train.milestones", "train.gamma")
    if step_flags and cfg.train.schedule != "step":
        raise NinError(f"{step_flags[0]} applies to --schedule step; this run's schedule is {cfg.train.schedule}")
    rollback_flags = given("train.rollback_factor", "train.max_rollbacks")
    if rollback_flags and cfg.train.on_diverge != "rollback":
        raise NinError(f"{rollback_flags[0]} applies to --on-diverge rollback; this run's is {cfg.train.on_diverge}")
    if "train.tensorboard_every" in changes and not cfg.train.tensorboard:
        raise NinError("--tensorboard-every applies to --tensorboard; this run does not log for TensorBoard")
    if changes.get("data.whiten") and changes.get("data.normalize"):
        raise NinError("--whiten replaces --normalize; give one of them")


def cmd_train(args: argparse.Namespace) -> int:
    from nin.training import distributed
    from nin.training.runtime import configure_runtime

    configure_runtime(args.threads)
    # Under torchrun: join the other processes, and leave them on every way out (a return, an error,
    # KeyboardInterrupt) with gloo's threads stopped before the interpreter exits (nin.training.distributed).
    with distributed.joined(settings_given(args).get("device", "auto")):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from nin.training.config import override, preset
    from nin.training.distributed import current
    from nin.training.run import default_run_dir, result_lines, train

    if args.config:
        from nin.training.config import load_config

        cfg = load_config(args.config, args.preset)
    else:
        cfg = preset(args.preset or "default")
    changes = settings_given(args)
    changes.update({f"model.options.{k}": v for k, v in _model_options(args).items()})
    if args.resume:
        extra = [f"--{n}" for n in ("config", "preset", "out") if getattr(args, n)]
        extra += [flag_of(p) for p in sorted(changes) if p not in ("train.epochs", "train.max_steps", "device")]
        if extra:
            raise NinError(f"--resume continues a run with its saved settings; drop {extra[0]} "
                           f"(only --epochs, --max-steps and --device may change)")
    else:
        cfg = override(cfg, changes)

    main = current().is_main
    if args.resume:
        keep = {"epochs": changes.get("train.epochs"), "max_steps": changes.get("train.max_steps"),
                "device": changes.get("device")}
        result = train(cfg, resume=args.resume, keep=keep, progress=not args.quiet and main, handle_signals=True,
                       log=lambda line: print(f"nin: note: {line}", file=sys.stderr, flush=True))
    else:
        _check_train_flags(changes, cfg)  # the ranges are checked once, when the run is built
        out = Path(args.out) if args.out else default_run_dir(cfg)
        # The main process creates the run directory (nin.training.run.train), so only it removes one a failure
        # left empty.
        with _removed_if_failed(out) if main else contextlib.nullcontext():
            result = train(cfg, out, progress=not args.quiet and main, handle_signals=True)
    if not main:
        return 0
    lines, notes = result_lines(result)
    for line in notes:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    return 128 + result.signals[0] if result.signals else 0


def cmd_study(args: argparse.Namespace) -> int:
    from nin.experiments.study import STUDIES, get_study, run_study
    from nin.experiments.study_report import write_report

    if args.list or not args.name:
        for s in STUDIES.values():
            print(f"{s.name:<15} v{s.version}  {s.title}")
            for b, budget in s.budgets.items():
                print(f"  {b:<5} {len(budget.variants)} variants x {budget.seeds} seeds: {budget.description}")
        return 0
    from nin.training.runtime import configure_runtime

    study = get_study(args.name)
    sc = StudyConfig(**given_fields(args, StudyConfig))
    out = Path(args.out or f"runs/study-{study.name}-{sc.budget}")
    with _removed_if_failed(out, disposable=("study.json", "config.json")):
        if not args.report_only:
            configure_runtime(args.threads)
            run_study(study, sc, out, log=lambda line: print(line, flush=True))
        path = write_report(study, sc, out, sc.command(study.name, out))
    print(f"report: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from nin.experiments.tune import parse_space, summary, tune
    from nin.training.config import override, preset

    if args.config:
        from nin.training.config import load_config

        base = load_config(args.config, args.preset)
    else:
        base = preset(args.preset or "default")
    tc = TuneConfig(base=override(base, settings_given(args)), **given_fields(args, TuneConfig))
    tc = replace(tc, out=tc.out_dir(), space=parse_space(args.space, tc.max_epochs))
    with _removed_if_failed(tc.out, disposable=("tune.db",)):
        result = tune(tc)
    print(summary(result))
    return 0 if result.best is not None else 1
