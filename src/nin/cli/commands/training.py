"""``nin train``, ``nin study``, ``nin tune``: runs, studies over seeds, and hyperparameter search."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
from pathlib import Path

from nin.bounds import Range, flag_type
from nin.cli.options import (
    SPEED,
    THREADS,
    _add_model_options,
    _model_options,
    _path,
    _ranged,
    add_settings,
    flag_of,
    flagged,
    settings_given,
)
from nin.data import DataConfig
from nin.errors import NinError
from nin.training.config import CheckpointConfig, ModelConfig, RunConfig, TrainConfig


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: nin28 on Fashion-MNIST)")
    p.add_argument("--preset", help="recipe to start from: default (nin28, fast), d2l (the seed's recipe) or "
                                    "nin-cifar10 (the paper's CIFAR-10 network and recipe)")
    p.add_argument("--config", type=_path, metavar="FILE",
                   help="settings from a TOML, YAML or JSON file (a run's config.json "
                        "repeats that run); flags given here override it")
    add_settings(p, ModelConfig, "model", ("name",))
    _add_model_options(p)
    add_settings(p, ModelConfig, "model", ("init",))
    # Every field with help text gets its flag: a new setting is one field (nin.cli.options.flagged).
    add_settings(p.add_argument_group("data"), DataConfig, "data", flagged(DataConfig))
    add_settings(p.add_argument_group("optimization"), TrainConfig, "train",
                 flagged(TrainConfig, exclude=(*SPEED, "eval_batch_size")))
    g = p.add_argument_group("speed")
    add_settings(g, TrainConfig, "train", (*SPEED, "eval_batch_size"))
    g.add_argument("--threads", type=flag_type(THREADS, int), help="CPU threads (default: all cores)")
    g = p.add_argument_group("run")
    add_settings(g, RunConfig, "", ("device", "seed"))
    g.add_argument("--out", type=_path, help="run directory (default runs/MODEL-DATE); must not exist yet")
    g.add_argument("--resume", type=_path, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its latest checkpoint")
    add_settings(g, CheckpointConfig, "checkpoint", ("every_steps", "keep_last"))
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
    add_settings(p, ModelConfig, "model", ("name",))
    add_settings(p, DataConfig, "data", ("dataset", "data_dir"))
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
    add_settings(p, RunConfig, "", ("device", "seed"))  # the seed: every trial's, and the sampler's
    p.add_argument("--out", type=_path,
                   help="directory for tune.db, trials/ and best.yaml (default runs/tune-DATE); an "
                        "existing one is continued")
    p.add_argument("--quiet", action="store_true", help="no line per finished trial")



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
    from nin.training.run import default_run_dir, summary_line, train

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
    from nin.experiments.study import STUDIES, StudyConfig, get_study, run_study
    from nin.experiments.study_report import write_report

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


def cmd_tune(args: argparse.Namespace) -> int:
    from datetime import datetime

    from nin.experiments.tune import TuneConfig, parse_space, summary, tune
    from nin.training.config import override, preset

    if args.config:
        from nin.training.config import load_config

        base = load_config(args.config, args.preset)
    else:
        base = preset(args.preset or "default")
    base = override(base, settings_given(args))
    out = Path(args.out) if args.out else Path("runs") / f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    tc = TuneConfig(base=base, out=out, trials=args.trials, workers=args.workers,
                    storage=args.storage, study_name=args.study_name, max_epochs=args.max_epochs,
                    space=parse_space(args.space, args.max_epochs), holdout=args.holdout, subset=args.subset,
                    threads=args.threads, startup_trials=args.startup_trials, quiet=args.quiet)
    with _removed_if_failed(out, disposable=("tune.db",)):
        result = tune(tc)
    print(summary(result))
    return 0 if result.best is not None else 1
