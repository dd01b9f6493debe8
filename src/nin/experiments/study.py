"""Studies: the seed's exercises as named, versioned experiments repeated over seeds.

A :class:`Study` asks one question (which learning rate diverges, what a 1x1 conv
buys, how to reduce the last block to the classes, ...) by training a few
:class:`Variant` s of one base configuration, each with several seeds. Its
:class:`Budget` s say how big that base is: ``cpu`` (the default) finishes within
about 20 minutes on a 2-core CPU, ``full`` is the seed's own setting for a GPU.

:func:`run_study` trains every (variant, seed) run into ``OUT/runs/`` and appends
one record per finished run to ``OUT/results.jsonl``, so an interrupted study
continues where it stopped. :func:`write_report` turns the records into
``report.md`` (mean and standard deviation over seeds, which runs diverged and
when), ``curves.png`` (learning curves overlaid), ``sweep.png`` (the swept value
against final test accuracy), ``configs/`` (each variant's exact configuration)
and ``study.json`` (the study, its budget and the environment).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from nin.atomic import make_dirs, write_error, write_text
from nin.bounds import bounded, check_ranges, option_strings, range_of, setting, within
from nin.data import DataConfig
from nin.errors import NinError, did_you_mean
from nin.training.config import TrainConfig

BUDGETS = ("cpu", "full")


@dataclass(frozen=True)
class Variant:
    """One arm of a study: ``changes`` are dotted paths into a RunConfig, e.g. ``{"train.lr": 0.05}``."""

    label: str
    changes: Mapping[str, Any]
    value: float | None = None  # the swept quantity, where it is a number (x axis of sweep.png)


@dataclass(frozen=True)
class Budget:
    """How big a study's runs are: a preset, changes to it shared by every variant, the variants, the seeds."""

    description: str
    preset: str
    base: Mapping[str, Any]  # dotted-path changes to the preset
    variants: tuple[Variant, ...]
    seeds: int = 3


@dataclass(frozen=True)
class Study:
    name: str
    version: int  # bumped whenever a budget or a variant changes, so old results are never mixed with new
    title: str
    question: str
    axis: str  # what the variants sweep, for the figures
    budgets: Mapping[str, Budget]
    log_axis: bool = False


# ------------------------------------------------------------------ the studies

_D2L_RECIPE = {  # the seed's optimizer at a CPU's scale: Xavier, plain SGD at a constant lr, no augmentation
    "model.init": "xavier", "train.momentum": 0.0, "train.nesterov": False, "train.weight_decay": 0.0,
    "train.schedule": "constant", "train.warmup": 0.0, "train.label_smoothing": 0.0, "data.flip": False,
    "data.normalize": False,
}
_CPU_DATA = {"data.subset": 20000, "data.test_subset": 5000, "train.epochs": 2}  # about 30-50 s a run
_FULL = {"train.amp": "auto"}  # the d2l preset at 224x224, 10 epochs, all 60,000 images; bf16 where native


def _lr_study() -> Study:
    lrs = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    variants = tuple(Variant(f"lr={lr:g}", {"train.lr": lr}, lr) for lr in lrs)
    return Study(
        "lr", 1, "Learning rate and divergence",
        "With the seed's recipe (Xavier init, plain SGD at a constant learning rate, no BatchNorm), which "
        "learning rates train, and from which one does training blow up or collapse to chance?",
        "learning rate",
        {
            "cpu": Budget("nin28 without BatchNorm at 28x28, the seed's recipe, 15,000 training images, "
                          "3 epochs, 5,000 test images", "default",
                          {**_D2L_RECIPE, "model.options.batch_norm": False, "data.subset": 15000,
                           "data.test_subset": 5000, "train.epochs": 3}, variants),
            "full": Budget("nin_d2l at 224x224, the seed's recipe, 10 epochs, all of Fashion-MNIST", "d2l",
                           dict(_FULL), variants),
        },
        log_axis=True,
    )


def _mlp_layers_study() -> Study:
    variants = tuple(Variant(f"mlp_layers={k}", {"model.options.mlp_layers": k}, k) for k in range(4))
    return Study(
        "mlp-layers", 1, "1x1 convolutions per block",
        "What do the 1x1 convolutions of an mlpconv block buy? Every block gets 0, 1, 2 (NiN's) or 3 of them "
        "(the seed's second exercise removes one).",
        "1x1 convs per block",
        {
            "cpu": Budget("nin28 (BatchNorm) at 28x28, the default one-cycle recipe, 20,000 training images, "
                          "2 epochs, 5,000 test images", "default", dict(_CPU_DATA), variants),
            "full": Budget("nin_d2l at 224x224, the seed's recipe, 10 epochs, all of Fashion-MNIST", "d2l",
                           dict(_FULL), variants),
        },
    )


def _head_study() -> Study:
    def arms(gradual: int) -> tuple[Variant, ...]:
        return (
            Variant("one-step + GAP", {"model.options.head_width": 10}),
            Variant(f"gradual ({gradual}) + GAP", {"model.options.head_width": gradual}),
            Variant("one-step + FC", {"model.options.head_width": 10, "model.options.head": "fc"}),
            Variant(f"gradual ({gradual}) + FC", {"model.options.head_width": gradual, "model.options.head": "fc"}),
        )

    return Study(
        "head", 1, "Reducing to the classes, and global average pooling against a fully connected head",
        "Should the last block go from its input straight to one channel per class (one step, as in d2l's "
        "384x5x5 -> 10x5x5) or keep its width until the last 1x1 conv (gradual)? And does global average "
        "pooling, NiN's central claim, do better than a fully connected layer over the class maps?",
        "classifier",
        {
            "cpu": Budget("nin28 (BatchNorm) at 28x28, the default one-cycle recipe, 20,000 training images, "
                          "2 epochs, 5,000 test images; the classifier block's 3x3 conv and first 1x1 conv are "
                          "10 (one step) or 96 (gradual) wide", "default", dict(_CPU_DATA), arms(96)),
            "full": Budget("nin_d2l at 224x224, the seed's recipe, 10 epochs, all of Fashion-MNIST; the last "
                           "block's convs are 10 (one step, d2l's) or 384 (gradual) wide", "d2l", dict(_FULL),
                           arms(384)),
        },
    )


def _regularization_study() -> Study:
    def arms(dropout: float) -> tuple[Variant, ...]:
        return tuple(
            Variant(f"BN {'on' if bn else 'off'}, dropout {p:g}",
                    {"model.options.batch_norm": bn, "model.options.dropout": p})
            for bn in (False, True) for p in (0.0, dropout)
        )

    return Study(
        "regularization", 1, "Dropout and BatchNorm",
        "What do dropout (NiN's, after the pooling stages) and BatchNorm (not in the paper) each change, alone "
        "and together?",
        "regularization",
        {
            "cpu": Budget("nin28 at 28x28 (dropout after each pooling stage when on), the default one-cycle "
                          "recipe at peak lr 0.05, 20,000 training images, 3 epochs, 5,000 test images",
                          "default", {**_CPU_DATA, "train.epochs": 3, "train.lr": 0.05}, arms(0.5)),
            "full": Budget("nin_d2l at 224x224 (its one dropout stage), the seed's recipe, 10 epochs, all of "
                           "Fashion-MNIST", "d2l", dict(_FULL), arms(0.5)),
        },
    )


def _init_study() -> Study:
    variants = tuple(Variant(s, {"model.init": s}) for s in ("xavier", "kaiming", "default"))
    return Study(
        "init", 1, "Weight initialization",
        "Xavier (d2l's choice) against Kaiming (He) and PyTorch's default, on a NiN without BatchNorm, where the "
        "starting scale of the weights is not normalized away.",
        "initialization",
        {
            "cpu": Budget("nin28 without BatchNorm at 28x28, the default one-cycle recipe at peak lr 0.05, "
                          "20,000 training images, 3 epochs, 5,000 test images", "default",
                          {**_CPU_DATA, "train.epochs": 3, "train.lr": 0.05, "model.options.batch_norm": False},
                          variants),
            "full": Budget("nin_d2l at 224x224, the seed's recipe, 10 epochs, all of Fashion-MNIST", "d2l",
                           dict(_FULL), variants),
        },
    )


def _registry(*studies: Study) -> Mapping[str, Study]:
    table: dict[str, Study] = {}
    for s in studies:
        if s.name in table:
            raise ValueError(f"study {s.name!r} is defined twice")
        if set(s.budgets) != set(BUDGETS):
            raise ValueError(f"study {s.name!r} must define the budgets {', '.join(BUDGETS)}")
        table[s.name] = s
    return MappingProxyType(table)


STUDIES: Mapping[str, Study] = _registry(
    _lr_study(), _mlp_layers_study(), _head_study(), _regularization_study(), _init_study()
)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise NinError(f"unknown study {name!r}{did_you_mean(name, STUDIES)} (available: {', '.join(STUDIES)})")
    return STUDIES[name]


# ------------------------------------------------------------------ configs


@dataclass
class StudyConfig:
    """How to run a study: which budget, and what to change about it (each field with help text is a flag of
    ``nin study``; None: the budget's)."""

    budget: Literal["cpu", "full"] = setting(
        "cpu", "cpu (default): within about 20 minutes on a 2-core CPU; full: the seed's settings, for a GPU")
    seeds: int | None = bounded(None, 1, 1000, help="seeds per variant (default: the budget's, 3)")
    epochs: int | None = within(range_of(TrainConfig, "epochs"), None, help="override the budget's epochs")
    subset: int | None = within(range_of(DataConfig, "subset"), None, help="override the budget's training images")
    data_dir: str | None = setting(None, "directory holding the data files", path=True)
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    on_diverge: Literal["stop", "rollback"] = setting(
        "stop", "stop (default): a diverged run is recorded as such; rollback: retry it at a lower lr")
    extra: dict[str, Any] = field(default_factory=dict)  # more dotted-path changes of every run

    def budget_of(self, study: Study) -> Budget:
        if self.budget not in study.budgets:
            raise NinError(f"unknown budget {self.budget!r} (available: {', '.join(study.budgets)})")
        return study.budgets[self.budget]

    def seed_list(self, study: Study) -> list[int]:
        check_ranges(self)
        return list(range(self.seeds if self.seeds is not None else self.budget_of(study).seeds))

    def command(self, name: str, out: str | os.PathLike) -> str:
        """The ``nin study`` command that runs study ``name`` so into ``out``: the budget, and each other setting
        that is not its default."""
        words = ["nin study", name, "--budget", self.budget]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("help") and f.name != "budget" and value != f.default:
                words.append(f"{option_strings(StudyConfig, f.name)[0]} {value}")
        return " ".join([*words, "--out", str(out)])


def _recorded_config(record: dict[str, Any]) -> dict[str, Any] | None:
    """A recorded run's config with the settings added since it was recorded at their defaults (so a study
    recorded before a new setting continues), or None if it no longer reads as a config."""
    from nin.training.config import RunConfig

    try:
        return json.loads(json.dumps(RunConfig.from_dict(record["config"]).to_dict()))
    except (NinError, KeyError, TypeError):
        return None


def variant_config(study: Study, sc: StudyConfig, variant: Variant, seed: int):
    """The exact RunConfig of one run."""
    from nin.training.config import override, preset

    b = sc.budget_of(study)
    changes: dict[str, Any] = {**b.base, **variant.changes, "seed": seed, "device": sc.device,
                               "train.on_diverge": sc.on_diverge}
    if sc.epochs is not None:
        changes["train.epochs"] = sc.epochs
    if sc.subset is not None:
        changes["data.subset"] = sc.subset
    if sc.data_dir is not None:
        changes["data.data_dir"] = sc.data_dir
    changes.update(sc.extra)
    return override(preset(b.preset), changes)


# ------------------------------------------------------------------ running


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "-", label).strip("-").replace("=", "")


RESULTS = "results.jsonl"


def load_records(out: Path) -> list[dict[str, Any]]:
    """The finished runs recorded in ``out/results.jsonl`` (a torn last line, from a crash, is ignored)."""
    path = out / RESULTS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a write that fails (a full disk) is cut off again, so the file keeps whole lines."""
    data = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e) from e
    end = None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":  # a line torn by a crash: end it, or this record joins it
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        if end is not None:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
        raise write_error(path, e) from e
    finally:
        os.close(fd)


def _read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _model_cost(cfg) -> tuple[int, int]:
    """Parameters and forward multiply-accumulates per image of the run's model."""
    from nin.analysis.profile import count_flops
    from nin.models import create_model
    from nin.training.run import model_options

    model = create_model(cfg.model.name, **model_options(cfg))
    return sum(p.numel() for p in model.parameters()), count_flops(model) // 2


def _prepare(run_dir: Path) -> bool:
    """True if ``run_dir`` holds a checkpoint to resume. A directory left by a run that crashed before its
    first checkpoint holds nothing but its config and is cleared; anything else unexpected is refused."""
    from nin.training.checkpoint import list_checkpoints

    if not run_dir.exists():
        return False
    if list_checkpoints(run_dir):
        return True
    leftovers = {p.name for p in run_dir.iterdir()}
    if leftovers <= {"config.json", ".config.json.tmp", "checkpoints"}:
        shutil.rmtree(run_dir)
        return False
    raise NinError(f"{run_dir}: an unfinished run without a checkpoint holds {', '.join(sorted(leftovers))}; "
                   "move it away to run it again")


def chance(num_classes: int) -> float:
    """Accuracies below this count as "at chance": a run that learned nothing, or collapsed."""
    return 1.5 / num_classes


def run_study(study: Study, sc: StudyConfig, out: str | os.PathLike,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every (variant, seed) run not yet recorded in ``out``; return all records of this budget."""
    from nin.training.run import environment, train
    from nin.training.runtime import resolve_device
    from nin.training.trainer import Diverged

    out = Path(out)
    try:
        make_dirs(out)
    except OSError as e:
        raise write_error(out, e) from None
    budget, seeds = sc.budget_of(study), sc.seed_list(study)
    meta = {"study": study.name, "version": study.version, "budget": sc.budget}
    _check_meta(out, meta)
    done = {(r["variant"], r["seed"]): r for r in load_records(out) if _same(r, meta)}
    total, k = len(budget.variants) * len(seeds), 0
    for variant in budget.variants:
        for seed in seeds:
            k += 1
            cfg = variant_config(study, sc, variant, seed)
            previous = done.get((variant.label, seed))
            if previous is not None and _recorded_config(previous) == json.loads(json.dumps(cfg.to_dict())):
                log(f"[{k}/{total}] {variant.label}, seed {seed}: recorded, {_outcome(previous)}")
                continue
            if previous is not None:
                raise NinError(f"{out}: {variant.label}, seed {seed} was recorded with other settings; "
                               "use another --out for changed settings")
            run_dir = out / "runs" / f"{slug(variant.label)}-seed{seed}"
            resume = _prepare(run_dir)
            params, macs = _model_cost(cfg)
            t0 = time.perf_counter()
            record: dict[str, Any] = {**meta, "variant": variant.label, "value": variant.value, "seed": seed,
                                      "params": params, "macs": macs, "run_dir": str(run_dir.relative_to(out))}
            try:
                result = train(cfg, run_dir, resume=run_dir if resume else None, progress=False)
                history, rollbacks = result.history, result.trainer.rollbacks
                record["status"] = "ok"
                device = result.trainer.device
            except Diverged as e:
                history, rollbacks = _read_history(run_dir), _read_rollbacks(run_dir)
                record["status"] = "diverged"
                record["diverged"] = {"step": e.step, "epoch": e.epoch + 1,
                                      "loss": e.loss if math.isfinite(e.loss) else str(e.loss)}
                device = resolve_device(cfg.device)
            record.update(history=history, rollbacks=rollbacks, seconds=time.perf_counter() - t0,
                          config=cfg.to_dict(), env=environment(device))
            if record["status"] == "ok" and history and history[-1]["test_acc"] < chance(_classes(cfg)):
                record["status"] = "at chance"
            record = json.loads(json.dumps(record))  # as it will read back: lists, not tuples
            _append(out / RESULTS, record)
            done[(variant.label, seed)] = record
            log(f"[{k}/{total}] {variant.label}, seed {seed}: {_outcome(record)} ({record['seconds']:.0f} s)")
    return [done[(v.label, s)] for v in budget.variants for s in seeds]


def _classes(cfg) -> int:
    from nin.data import NAMES

    info = NAMES.get(cfg.data.dataset)
    return cfg.model.options.get("num_classes") or (info.num_classes if info else 10)


def _read_rollbacks(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rollbacks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _same(record: dict[str, Any], meta: dict[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in meta.items())


def _check_meta(out: Path, meta: dict[str, Any]) -> None:
    """One output directory holds one study at one version and budget."""
    path = out / "study.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise NinError(f"{path}: not valid JSON") from None
        if not _same(old, meta):
            raise NinError(f"{out}: holds study {old.get('study')!r} version {old.get('version')} budget "
                           f"{old.get('budget')!r}; use another --out")
    else:
        write_text(path, json.dumps(meta, indent=1))


def _outcome(r: dict[str, Any]) -> str:
    if r["status"] == "diverged":
        d = r["diverged"]
        return f"diverged at step {d['step']} (epoch {d['epoch']}, loss {d['loss']})"
    acc = r["history"][-1]["test_acc"] if r["history"] else float("nan")
    extra = f", {len(r['rollbacks'])} rollback(s)" if r.get("rollbacks") else ""
    return f"test acc {acc:.4f}{' (at chance)' if r['status'] == 'at chance' else ''}{extra}"
