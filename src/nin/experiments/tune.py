"""``nin tune``: hyperparameter search with Optuna.

A study searches the settings in a :class:`Dim` table (learning rate, batch size, weight
decay, schedule, epochs by default) with a seeded TPE sampler. Each trial trains a run
through :func:`nin.run.train` into ``<out>/trials/<number>`` and is scored on images held out
from the *training* split (``DataConfig.holdout``), never on the test set. After each epoch
the holdout accuracy is reported to Optuna and a :class:`MedianPruner` stops trials that fall
below the median of finished trials at that epoch (never at a trial's last epoch, which
would save nothing). Pruning compares trials at the same epoch whatever their length, so a
long run, still at a high learning rate, can look weak beside a short one that has already
annealed; ``startup_trials`` finished trials are collected before any pruning.

A trial whose loss diverges (:class:`nin.training.trainer.Diverged`) is recorded as *pruned* with the user
attributes ``diverged``, ``step``, ``epoch`` and ``loss``: TPE then counts it as a bad
trial and steers away from its settings (a failed trial would teach it nothing), and tables
show its state as ``diverged``.

Trials live in an Optuna storage: ``sqlite:///<out>/tune.db`` by default, or any database URL
Optuna accepts, so workers on several machines can search one study together. ``workers``
processes on this machine share the study, each with its share of the trials and of the
CPU cores. The best finished trial's full configuration, without the holdout (and without
the tuning's ``subset`` budget), is written to ``<out>/best.yaml`` for ``nin train --config``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from nin.atomic import write_text
from nin.bounds import THREADS, bounded, check_ranges, range_of, setting, within
from nin.data import DataConfig
from nin.errors import NinError
from nin.experiments.storage import _shown, import_optuna, open_storage
from nin.training import run, runtime
from nin.training.callbacks.base import Callback
from nin.training.config import RunConfig, TrainConfig, override
from nin.training.trainer import Diverged, Trainer

DEFAULT_HOLDOUT = 5000  # validation images, at most a tenth of the training split
STUDY_NAME = "nin-tune"
METRIC = "test_acc"  # the trainer's evaluation metric; with a holdout, accuracy on held-out training images
# Settings that may differ between the workers of one study (paths, machines, speed switches, logging).
MAY_DIFFER = frozenset({
    "device", "data.data_dir", "data.download", "data.verify", "data.test_dir", "train.amp", "train.channels_last",
    "train.compile", "train.fused", "train.fold_bn", "train.eval_batch_size", "train.check_every",
    "train.tensorboard", "train.tensorboard_every",
})


# ------------------------------------------------------------------ search space


@dataclass(frozen=True)
class Dim:
    """One searched :class:`~nin.training.config.TrainConfig` setting: a float or int range (log-scaled or not),
    or choices."""

    name: str
    kind: Literal["float", "int", "choice"]
    low: float = 0
    high: float = 0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} {'|'.join(map(str, self.choices))}"
        return f"{self.name} {self.low:g}..{self.high:g}{' (log)' if self.log else ''}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def search_space(max_epochs: int = 3) -> tuple[Dim, ...]:
    """The default search: learning rate, batch size, weight decay, schedule and epochs up to ``max_epochs``."""
    return (
        Dim("lr", "float", 1e-3, 0.5, log=True),
        Dim("batch_size", "choice", choices=(64, 128, 256)),
        Dim("weight_decay", "float", 1e-6, 1e-2, log=True),
        Dim("schedule", "choice", choices=("constant", "cosine", "onecycle", "step")),
        Dim("epochs", "int", 1, max_epochs),
    )


def _value(s: str) -> Any:
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


def _check_setting(name: str, value: Any) -> Any:
    """``value`` if TrainConfig accepts it for ``name`` (type and range), else a one-line NinError."""
    cfg = RunConfig.from_dict({"train": {name: value}}).train
    cfg.validate()
    return getattr(cfg, name)


def parse_space(overrides: list[str], max_epochs: int = 3) -> tuple[Dim, ...]:
    """The default space changed by ``KEY=LOW..HIGH[:log|:linear]``, ``KEY=A,B,...`` or ``KEY=VALUE`` items.

    KEY is any TrainConfig setting; a range keeps the default's scale (log for lr and weight decay)
    unless ``:log`` or ``:linear`` says otherwise, and is an int range where the setting is an int.
    """
    space = {d.name: d for d in search_space(max_epochs)}
    known = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        key, eq, spec = (s.strip() for s in item.partition("="))
        key = key.replace("-", "_")
        if not eq or not spec:
            raise NinError(f"--space items look like KEY=LOW..HIGH, KEY=A,B or KEY=VALUE, got {item!r}")
        if key not in known:
            raise NinError(f"--space: unknown setting {key!r} (a train setting: {', '.join(sorted(known))})")
        try:
            if ".." in spec:
                spec, _, scale = spec.partition(":")
                low, _, high = spec.partition("..")
                lo, hi = _check_setting(key, _value(low)), _check_setting(key, _value(high))
                if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not lo < hi:
                    raise NinError(f"--space {item!r}: a range needs two numbers, low < high")
                log = {"log": True, "linear": False, "": getattr(space.get(key), "log", False)}.get(scale)
                if log is None:
                    raise NinError(f"--space {item!r}: the scale after ':' is log or linear")
                if log and lo <= 0:
                    raise NinError(f"--space {item!r}: a log range must be above 0")
                kind = "int" if isinstance(getattr(TrainConfig(), key), int) else "float"
                space[key] = Dim(key, kind, lo, hi, log=log)
            else:
                space[key] = Dim(key, "choice", choices=tuple(_check_setting(key, _value(v)) for v in spec.split(",")))
        except NinError as e:
            if str(e).startswith("--space"):
                raise
            raise NinError(f"--space {item!r}: {e}") from None
    return tuple(space.values())


# ------------------------------------------------------------------ configuration


@dataclass
class TuneConfig:
    """One ``nin tune`` invocation. ``base`` holds every setting a trial does not search. Each field with help
    text is a flag of ``nin tune``."""

    base: RunConfig = field(default_factory=RunConfig)
    trials: int = bounded(20, 1, 100_000, metavar="N", help="trials to add, over all workers (default 20)")
    workers: int = bounded(1, 1, 256, metavar="N",
                           help="worker processes on this machine sharing the study and the cores (default 1)")
    # validation images; None: base.data.holdout, else min(5000, a tenth)
    holdout: int | None = within(range_of(DataConfig, "holdout"), None, metavar="N",
                                 help="validation images held out from the training split (default: 5000, at most "
                                      "a tenth)")
    # a budget: best.yaml leaves it out
    subset: int | None = within(range_of(DataConfig, "subset"), None, metavar="N",
                                help="train each trial on N of the remaining training images")
    max_epochs: int = within(range_of(TrainConfig, "epochs"), 3, metavar="N",
                             help="epochs are searched in 1..N (default 3)")
    space: tuple[Dim, ...] | None = None  # None: search_space(max_epochs)
    startup_trials: int = bounded(5, 0, 10_000, metavar="N",
                                  help="random trials before TPE, and finished trials before pruning (default 5)")
    storage: str | None = setting(None, "Optuna database URL shared by workers on several machines (default: "
                                        "sqlite:///OUT/tune.db)", metavar="URL")
    study_name: str = setting(STUDY_NAME, "study in the storage; continued if it exists")
    threads: int | None = within(THREADS, None, metavar="N", help="torch threads per worker (default: cores / "
                                                                   "workers)")
    out: Path | None = setting(None, "directory for tune.db, trials/ and best.yaml (default runs/tune-DATE); an "
                                     "existing one is continued", path=True)
    quiet: bool = setting(False, "no line per finished trial", action="store_true")

    def out_dir(self) -> Path:
        """``out``, else a new ``runs/tune-DATE``."""
        return Path(self.out) if self.out is not None else Path("runs") / f"tune-{_dt.datetime.now():%Y%m%d-%H%M%S}"

    def resolved_space(self) -> tuple[Dim, ...]:
        return self.space if self.space is not None else search_space(self.max_epochs)


@dataclass
class Plan:
    """What the parent settled before starting workers; passed to each of them."""

    url: str
    study_name: str
    out: Path
    trial_base: RunConfig  # base with the budget (holdout, subset): what every trial trains
    final_base: RunConfig  # base without the budget: what best.yaml holds
    space: tuple[Dim, ...]
    seed: int
    start: int  # trials in the study before this invocation
    threads: int
    startup_trials: int
    quiet: bool


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def with_params(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with the searched train settings set."""
    return override(cfg, {f"train.{k}": v for k, v in params.items()})


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))  # tuples become lists, as in any stored or YAML copy


def _setup(cfg: RunConfig, space: tuple[Dim, ...]) -> dict[str, Any]:
    """The settings that define the objective, flat (``section.key``), without the searched ones."""
    searched = {f"train.{d.name}" for d in space}
    flat: dict[str, Any] = {}
    for key, value in _jsonable(cfg.to_dict()).items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[f"{key}.{k}" if k else key] = v
    return {k: v for k, v in flat.items() if k not in MAY_DIFFER and k not in searched}


# ------------------------------------------------------------------ storage and study


def storage_url(tc: TuneConfig, out: Path) -> str:
    return tc.storage if tc.storage is not None else f"sqlite:///{(out / 'tune.db').resolve()}"


def prepare_out(out: Path) -> Path:
    """A new or empty directory, or one a previous ``nin tune`` wrote (continued, never overwritten)."""
    if out.exists() and not out.is_dir():
        raise NinError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not ((out / "tune.db").exists() or (out / "trials").is_dir()):
        raise NinError(f"{out}: exists and is not a nin tune directory; choose another --out")
    try:
        (out / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NinError(f"{out}: cannot write the tune directory ({e.strerror or e})") from None
    return out


def open_study(storage, name: str, space: tuple[Dim, ...], setup: dict[str, Any]):
    """Create the study, or load it and check that it searched the same space on the same setting."""
    optuna = import_optuna()
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    where = f"study {name!r} in {_shown(storage.url)}"
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise NinError(f"{where} {'minimizes' if study.directions[0].name == 'MINIMIZE' else 'has several objectives'}"
                       f"; nin tune maximizes holdout accuracy (use another --study-name)")
    attrs = study.user_attrs
    wanted = {"space": [d.to_dict() for d in space], "setup": setup}
    if "space" not in attrs:
        if study.trials:
            raise NinError(f"{where} was not made by nin tune; use another --study-name")
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return study
    if attrs["space"] != wanted["space"]:
        was = ", ".join(Dim(**{**d, "choices": tuple(d["choices"])}).describe() for d in attrs["space"])
        raise NinError(f"{where} searched another space ({was}); continue it with the same --max-epochs and "
                       f"--space, or use another --study-name or --out")
    for key in sorted(set(setup) | set(attrs["setup"])):
        old, new = attrs["setup"].get(key), setup.get(key)
        if old != new:
            raise NinError(f"{where} was run with {key}={old!r}, this run has {new!r}; continue it with the same "
                           f"settings, or use another --study-name or --out")
    return study


# ------------------------------------------------------------------ trials


class PruningCallback(Callback):
    """Report each epoch's holdout accuracy to an Optuna trial; raise ``TrialPruned`` when the pruner says so."""

    def __init__(self, trial, metric: str = METRIC) -> None:
        self.trial, self.metric = trial, metric
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.history = trainer.history
        epoch, value = int(metrics["epoch"]), float(metrics[self.metric])
        self.trial.report(value, epoch)
        if epoch < trainer.config.epochs and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"epoch {epoch}: {self.metric} {value:.4f} is below the median")


def _finite_or_text(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def objective(trial, plan: Plan) -> float:
    """Train one trial's run and return its last epoch's holdout accuracy."""
    import optuna

    params = {d.name: d.suggest(trial) for d in plan.space}
    cfg = with_params(plan.trial_base, params)
    run_dir = plan.out / "trials" / str(trial.number)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("config", _jsonable(with_params(plan.final_base, params).to_dict()))
    pruning = PruningCallback(trial)
    t0 = time.perf_counter()
    try:
        result = run.train(cfg, run_dir, callbacks=[pruning], progress=False)
    except Diverged as e:
        for key, value in {"diverged": True, "step": e.step, "epoch": e.epoch + 1,
                           "loss": _finite_or_text(e.loss)}.items():
            trial.set_user_attr(key, value)
        raise optuna.TrialPruned(str(e)) from None
    finally:
        history = pruning.history
        trial.set_user_attr("wall_time", round(time.perf_counter() - t0, 2))
        trial.set_user_attr("epochs_run", len(history))
        if history:
            best = max(history, key=lambda h: h[METRIC])
            trial.set_user_attr("best_epoch", int(best["epoch"]))
            trial.set_user_attr("best_value", best[METRIC])
            trial.set_user_attr("examples_per_sec", round(sum(h["examples_per_sec"] for h in history) / len(history)))
    return result.history[-1][METRIC]


def state(t) -> str:
    """A trial's state for tables: complete, pruned, diverged, fail, running, waiting."""
    return "diverged" if t.user_attrs.get("diverged") else t.state.name.lower()


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _shown_value(t) -> str:
    """The objective value; for a pruned trial its last reported value, in parentheses."""
    if t.state.name == "COMPLETE":
        return f"{t.value:.4f}"
    if t.intermediate_values:
        return f"({t.intermediate_values[max(t.intermediate_values)]:.4f})"
    return "-"


def trial_line(t) -> str:
    a = t.user_attrs
    params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    why = f" (loss {a.get('loss')} at step {a.get('step')})" if a.get("diverged") else ""
    return (f"trial {t.number}: {state(t)}{why} {_shown_value(t)}  {params}  "
            f"({a.get('epochs_run', 0)} epoch(s), {a.get('wall_time', 0):.0f} s, pid {a.get('pid', '?')})")


def run_worker(plan: Plan, worker: int, n_trials: int) -> int:
    """Run ``n_trials`` trials of the plan's study in this process; the entry point of each worker process."""
    optuna = import_optuna()
    runtime.configure_runtime(plan.threads)
    seed = random.Random(f"{plan.seed}/{plan.start}/{worker}").getrandbits(31)  # distinct per worker and run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.startup_trials, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=plan.startup_trials, n_warmup_steps=0)
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.url), sampler=sampler,
                              pruner=pruner)
    report = [] if plan.quiet else [lambda _study, t: print(trial_line(t), flush=True)]
    study.optimize(lambda trial: objective(trial, plan), n_trials=n_trials, callbacks=report)
    return n_trials


# ------------------------------------------------------------------ the search


@dataclass
class TuneResult:
    study_name: str
    storage: str  # shown without a password
    out: Path
    trials: list[Any]  # optuna FrozenTrial, all of the study's
    best: Any | None  # the best finished FrozenTrial, None if none finished
    best_config: Path | None  # <out>/best.yaml


def _budget(tc: TuneConfig) -> tuple[RunConfig, RunConfig, str]:
    """The trials' config (with holdout and subset) and best.yaml's (without), checked against the data."""
    base = tc.base
    if base.train.max_steps is not None:
        raise NinError("nin tune trains whole epochs; drop train.max_steps from the config")
    probe = replace(base, data=replace(base.data, holdout=None, subset=None, test_subset=None, whiten=False))
    n = len(run.build(probe).train_loader.labels)  # checks the data, the model and the settings early
    holdout = tc.holdout or base.data.holdout or min(DEFAULT_HOLDOUT, n // 10)
    if not 0 < holdout < n:
        raise NinError(f"--holdout must be between 1 and {n - 1}, got {holdout}")
    subset = tc.subset or base.data.subset
    if subset is not None and subset > n - holdout:
        raise NinError(f"--subset must be between 1 and {n - holdout} ({n} training images, {holdout} held out), "
                       f"got {subset}")
    trial_base = replace(base, data=replace(base.data, holdout=holdout, subset=subset))
    final_base = replace(base, data=replace(base.data, holdout=None, subset=base.data.subset))
    note = f"{subset or n - holdout} of {n - holdout} training images, scored on {holdout} held out"
    return trial_base, final_base, note


def tune(tc: TuneConfig) -> TuneResult:
    """Run ``tc.trials`` trials on ``tc.workers`` worker processes; write ``best.yaml``; return the study's trials."""
    check_ranges(tc)
    import_optuna()
    space = tc.resolved_space()
    out = tc.out_dir()
    # A storage given by URL is opened first: a bad one fails before anything is written or any data read.
    storage = open_storage(tc.storage) if tc.storage is not None else None
    out = prepare_out(out)
    url = storage_url(tc, out)
    if storage is None:
        storage = open_storage(url, flag=False)
    trial_base, final_base, note = _budget(tc)
    study = open_study(storage, tc.study_name, space, _setup(trial_base, space))
    start = len(study.trials)
    if start == 0 and any((out / "trials").iterdir()):
        raise NinError(f"{out}/trials holds runs of another study; choose another --out")
    workers = min(tc.workers, tc.trials)
    threads = tc.threads or max(1, cores() // workers)
    plan = Plan(url, tc.study_name, out, trial_base, final_base, space, trial_base.seed, start, threads,
                tc.startup_trials, tc.quiet)
    if not tc.quiet:
        print(f"study {tc.study_name!r} in {_shown(url)}: {start} trial(s) so far; adding {tc.trials} on "
              f"{workers} worker(s) with {threads} thread(s) each")
        print(f"searching {', '.join(d.describe() for d in space)}")
        print(f"data: {trial_base.data.dataset}, {note}", flush=True)
    shares = [tc.trials // workers + (i < tc.trials % workers) for i in range(workers)]
    if workers == 1:
        run_worker(plan, 0, shares[0])
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_worker, plan, i, n) for i, n in enumerate(shares)]
            errors = [f.exception() for f in futures]  # waits for every worker
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.value is not None and t.state.name == "COMPLETE"]
    best = study.best_trial if finished else None
    path = write_best(out / "best.yaml", best, tc.study_name) if best is not None else None
    return TuneResult(tc.study_name, _shown(url), out, trials, best, path)


def write_best(path: Path, best, study_name: str) -> Path:
    """``best.yaml``: the best trial's full run configuration, for ``nin train --config``."""
    import yaml

    header = (f"# nin tune: trial {best.number} of study {study_name!r}, holdout accuracy {best.value:.4f}\n"
              f"# the full run configuration, without the holdout: nin train --config {path}\n")
    return write_text(path, header + yaml.safe_dump(_jsonable(best.user_attrs["config"]), sort_keys=False))


def table(trials: list[Any], space_names: list[str] | None = None) -> str:
    """Trials as an aligned text table: number, state, value, parameters, epochs run, time, worker."""
    names = space_names or list(dict.fromkeys(k for t in trials for k in t.params))
    head = ["trial", "state", "holdout acc", *names, "epochs run", "time", "pid"]
    rows = [[str(t.number), state(t), _shown_value(t),
             *(_fmt(t.params[k]) if k in t.params else "-" for k in names),
             str(t.user_attrs.get("epochs_run", "-")), f"{t.user_attrs.get('wall_time', 0):.0f} s",
             str(t.user_attrs.get("pid", "-"))] for t in sorted(trials, key=lambda t: t.number)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def summary(result: TuneResult) -> str:
    lines = [table(result.trials), ""]
    b = result.best
    if b is None:
        lines.append("no trial has finished: no best configuration yet")
    else:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in b.params.items())
        lines += [f"best: trial {b.number}, holdout accuracy {b.value:.4f} (best epoch "
                  f"{b.user_attrs.get('best_epoch', '?')}): {params}",
                  f"best config: {result.best_config}  (nin train --config {result.best_config} trains it on the "
                  "full training set and reports test accuracy)"]
    return "\n".join(lines)
