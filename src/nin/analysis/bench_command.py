"""``nin bench`` as one library call (:func:`bench_command`): the speed benchmark or time to accuracy, from the
settings its flags give, and the record of the run.

The flags are settings by dotted path, as :func:`nin.cli.options.settings_given` returns them: ``bench.NAME`` is a
field of :class:`~nin.analysis.bench.BenchConfig` (``bench.train.amp``: one of its speed switches) and ``tta.NAME``
one of :class:`TimeToAccuracy`. A setting that the chosen mode would ignore is refused (:func:`check_mode`), so a
flag never silently does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nin.analysis.bench import BenchConfig, run_bench, time_to_accuracy
from nin.bounds import option_strings, range_of, setting, within
from nin.data import DataConfig
from nin.errors import NinError
from nin.training.config import SPEED, RunConfig, TrainConfig


@dataclass
class TimeToAccuracy:
    """``nin bench --time-to-accuracy``: train a preset on real data and report when each target is first reached."""

    preset: str = setting("default", "recipe for --time-to-accuracy (default: default)")
    epochs: int | None = within(range_of(TrainConfig, "epochs"), None,
                                help="epochs for --time-to-accuracy (default: the preset's)")
    targets: str = setting("0.91,0.93", "test accuracies for --time-to-accuracy")
    subset: int | None = within(range_of(DataConfig, "subset"), None, metavar="N",
                                help="--time-to-accuracy on a seeded N of the training images (a quick check of the "
                                     "command; its times are not the recipe's)")
    seed: int | None = within(range_of(RunConfig, "seed"), None, metavar="N",
                              help="--time-to-accuracy: the run's seed (default: the preset's); records of one command "
                                   "over several seeds are reported as mean and std (benchmarks/render_accuracy.py)")
    holdout: int | None = within(range_of(DataConfig, "holdout"), None, metavar="N",
                                 help="--time-to-accuracy scored on N training images held out instead of the test "
                                      "set: for choosing settings")

    def target_list(self) -> list[float]:
        """The targets, accuracies in (0, 1]; a one-line NinError for anything else."""
        try:
            values = [float(v) for v in self.targets.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(0 < v <= 1 for v in values):
            raise NinError(f"--targets must be accuracies in (0, 1] separated by commas, got {self.targets!r}")
        return values


#: The config of each section of the settings' paths.
SECTIONS: dict[str, type] = {"bench": BenchConfig, "bench.train": TrainConfig, "tta": TimeToAccuracy}

#: The benchmark's settings that time to accuracy takes too, with the setting of the run each one changes.
AS_RUN = {"bench.device": "device", "bench.data_dir": "data.data_dir", "tta.epochs": "train.epochs",
          "tta.subset": "data.subset", "tta.seed": "seed", "tta.holdout": "data.holdout",
          **{f"bench.train.{s}": f"train.{s}" for s in SPEED}}


def _in(section: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``given`` in ``section``, by field name."""
    return {p.rpartition(".")[2]: v for p, v in given.items() if p.rpartition(".")[0] == section}


def _flag(path: str) -> str:
    section, _, name = path.rpartition(".")
    return option_strings(SECTIONS[section], name)[0]


def check_mode(given: Mapping[str, Any], what: str, *, baseline: bool = False, ablate: str | None = None) -> None:
    """Refuse the first setting of ``given`` (or ``baseline``, ``ablate``) that mode ``what`` would ignore."""
    if what == "time-to-accuracy":
        ignored = [_flag(p) for p in given if p.startswith("bench.") and p not in AS_RUN]
        ignored += ["--baseline"] * bool(baseline) + ["--ablate"] * (ablate is not None)
        if ignored:
            raise NinError(f"bench: {ignored[0]} is for the speed benchmark, not --time-to-accuracy")
    elif tta := [_flag(p) for p in given if p.startswith("tta.")]:
        raise NinError(f"bench: {tta[0]} is for --time-to-accuracy")


def bench_config(given: Mapping[str, Any]) -> BenchConfig:
    """The benchmark's config: the defaults, changed by the ``bench.*`` settings of ``given``."""
    return BenchConfig(**_in("bench", given), train=TrainConfig(**_in("bench.train", given)))


def tta_config(given: Mapping[str, Any]):
    """(the :class:`TimeToAccuracy` settings, the run they train): the preset changed by the ``tta.*`` settings and
    the benchmark's settings it takes too (:data:`AS_RUN`)."""
    from nin.training.config import override, preset

    tta = TimeToAccuracy(**_in("tta", given))
    tta.target_list()  # a bad --targets is refused before the preset is read
    return tta, override(preset(tta.preset), {AS_RUN[p]: v for p, v in given.items() if p in AS_RUN})


def ablated(ablate: str | None) -> bool | list[str]:
    """``--ablate``'s switches for :func:`run_bench`: ``"all"``, or a comma list of names."""
    return True if ablate == "all" else [a.strip() for a in (ablate or "").split(",") if a.strip()]


def bench_command(given: Mapping[str, Any], what: Literal["speed", "time-to-accuracy"] = "speed", *,
                  baseline: bool = False, ablate: str | None = None, threads: int | None = None,
                  record: str | None = None, command: str = "nin bench",
                  report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``nin bench``: ``given`` are its settings by dotted path; ``what`` the mode; ``baseline`` and ``ablate``
    (``"all"`` or a comma list) the speed benchmark's extra cases; ``record`` a folder to keep a record of the run
    in, naming ``command``. Returns the result with this machine's fingerprint, as ``--json`` prints it."""
    from nin.analysis.records import make_record, write_record
    from nin.training.runtime import configure_runtime

    check_mode(given, what, baseline=baseline, ablate=ablate)
    if record and os.path.exists(record) and not os.path.isdir(record):
        raise NinError(f"--record {record}: not a directory")  # before minutes of measuring, not after
    configure_runtime(threads)
    if what == "time-to-accuracy":
        tta, cfg = tta_config(given)
        result = {"preset": tta.preset, **time_to_accuracy(cfg, tta.target_list(), report)}
    else:
        result = run_bench(bench_config(given), baseline=baseline, ablate=ablated(ablate), report=report)
    rec = make_record(result, what, command)
    if record:
        report(f"record: {write_record(rec, record)}")
    return {**result, "machine": rec["machine"]}
