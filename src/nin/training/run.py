"""A training run: its configuration, presets, and the wiring from config to trainer.

:class:`RunConfig` is everything that defines a run. :func:`build` turns it into
a model and two device-resident loaders; :func:`train` adds a run directory
(``config.json``, metrics, curves, checkpoints) and runs the trainer.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nin.atomic import write_error, write_text
from nin.data import image_shape, load_splits
from nin.data.loader import Augment, DeviceLoader, channel_stats
from nin.errors import NinError
from nin.files import DirLock, check_dir
from nin.models import create_model, init_weights, model_entry
from nin.training import checkpoint as ckpt
from nin.training import distributed
from nin.training.callbacks import EMA, Checkpointer, CurvePlotter, MetricsWriter, ProgressBar, RollbackLog
from nin.training.callbacks.base import Callback
from nin.training.callbacks.tensorboard import TENSORBOARD_DIR, TensorBoard, hparams_of, require_tensorboard
from nin.training.config import RunConfig, load_run_config
from nin.training.runtime import resolve_device
from nin.training.signals import stop_on_signals
from nin.training.trainer import Diverged, Trainer


@dataclass
class Built:
    """What :func:`build` returns."""

    model: nn.Module
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    meta: dict[str, Any]  # what a checkpoint needs to rebuild the model and its input pipeline
    skipped: list[tuple[str, str]] = field(default_factory=list)  # image files left out as undecodable
    whitening: Any = None  # the fitted nin.data.whiten.Whitening with --whiten


WHITENING_FILE = "whitening.safetensors"  # in the run directory, with --whiten
# Held-out splits (a folder's test share, --holdout's validation images) are drawn with this seed,
# not the run's, so runs that differ only in seed are scored on the same images.
SPLIT_SEED = 20131216


def _subset(images, labels, n: int | None, seed: int, what: str):
    if n is None:
        return images, labels
    if not 0 < n <= len(images):
        raise NinError(f"{what} must be between 1 and {len(images)}, got {n}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def model_options(cfg: RunConfig) -> dict[str, Any]:
    """``create_model`` overrides of a run: its own, the input size it is fed, the data set's channels."""
    options = dict(cfg.model.options)
    if cfg.data.resize:  # the model is built for the size it is fed (a classic model's first FC layer depends on it)
        options["input_size"] = (cfg.data.resize, cfg.data.resize)
    shape = image_shape(cfg.data.dataset)
    if shape is not None:
        options.setdefault("in_channels", shape[0])
    return options


def build(cfg: RunConfig, *, init: bool = True) -> Built:
    """Model and loaders for ``cfg``. ``init=False`` skips weight init (the weights come from a checkpoint).

    The model takes the data set's channels and class count unless the run sets them
    (``in_channels``, ``num_classes``); an image folder is decoded to the model's channels and size.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    env = distributed.current()
    d = cfg.data
    options = model_options(cfg)
    entry = model_entry(cfg.model.name)
    channels = options.get("in_channels", entry.input_size[0])
    size = tuple(options.get("input_size", entry.input_size[1:]))
    # One process per machine reads (and if need be downloads and caches) the data first, then the others.
    splits, skipped = distributed.main_first(lambda: load_splits(d, channels=channels, size=size, seed=SPLIT_SEED))
    train_split, test_split = splits["train"], splits["test"]
    classes = train_split.classes
    options.setdefault("num_classes", len(classes))
    if options["num_classes"] != len(classes):
        raise NinError(f"{cfg.model.name} is set to {options['num_classes']} classes; {d.dataset} has {len(classes)} "
                       f"(leave --num-classes out to take the data set's)")

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, **options)
    if init:
        init_weights(model, cfg.model.init)
    model.to(device)

    x_train, y_train = train_split.images, train_split.labels
    x_test, y_test = test_split.images, test_split.labels
    if d.holdout is not None:  # validation images from the training split, drawn the same way for every seed
        if not 0 < d.holdout < len(x_train):
            raise NinError(f"--holdout must be between 1 and {len(x_train) - 1}, got {d.holdout}")
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
        x_test, y_test = x_train[idx[: d.holdout]], y_train[idx[: d.holdout]]
        x_train, y_train = x_train[idx[d.holdout:]], y_train[idx[d.holdout:]]
    x_train, y_train = _subset(x_train, y_train, d.subset, cfg.seed, "--subset")
    x_test, y_test = _subset(x_test, y_test, d.test_subset, cfg.seed + 1, "--test-subset")
    c = model.input_size[0]
    if x_train.shape[1] != c:
        raise NinError(f"{cfg.model.name} expects {c}-channel input; {d.dataset} has {x_train.shape[1]} channel(s)")
    size = tuple(model.input_size[1:])  # the loaders resize to what the model was built for
    mean, std = channel_stats(x_train) if d.normalize and not d.whiten else ((0.0,), (1.0,))
    whitening = None
    if d.whiten:
        if size != tuple(x_train.shape[2:]):
            raise NinError(f"--whiten works at the data's own size ({x_train.shape[2]}x{x_train.shape[3]}); "
                           "drop --resize or use a model of that input size")
        from nin.data.whiten import fit_whitening

        whitening = fit_whitening(x_train, seed=cfg.seed).to(device)
    common = dict(size=size, mean=mean, std=std, whiten=whitening,
                  channels_last=cfg.train.resolved(device).channels_last)
    # Every process holds the training set and takes its own slice of each global batch (batch_size each);
    # the test set is cut into one contiguous share per process, and the evaluation sums are all-reduced.
    train_loader = DeviceLoader(
        x_train.to(device), y_train.to(device), cfg.train.batch_size, shuffle=True, seed=cfg.seed,
        augment=Augment(d.crop_padding, d.flip, d.erase), rank=env.rank, world_size=env.world_size, **common,
    )
    lo, hi = len(x_test) * env.rank // env.world_size, len(x_test) * (env.rank + 1) // env.world_size
    test_loader = DeviceLoader(x_test[lo:hi].to(device), y_test[lo:hi].to(device), cfg.train.eval_batch_size,
                               **common)
    if env.rank:  # dropout masks differ between processes (the weights are the same: DDP copies rank 0's)
        torch.manual_seed(cfg.seed + 1_000_003 * env.rank)
    meta = {
        "model": {"name": cfg.model.name, "options": options},
        "data": {"dataset": d.dataset, "size": list(size), "mean": list(mean), "std": list(std),
                 "classes": list(classes), "whitening": WHITENING_FILE if whitening is not None else None},
        "config": cfg.to_dict(),
    }
    return Built(model, train_loader, test_loader, meta, skipped, whitening)


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{stamp}"


class RunDirBusy(NinError):
    """Another process owns the run directory (it is training into it, or resuming it)."""


def lock_run_dir(run_dir: Path) -> DirLock:
    """This process's exclusive hold on ``run_dir`` for as long as it trains into it (see :class:`DirLock`)."""
    return DirLock(run_dir, error=RunDirBusy,
                   busy="in use by another nin process (training or resuming it); wait for it to end, or choose "
                        "another --out")


def _reusable(out: Path) -> bool:
    return out.is_dir() and not any(out.iterdir())


def prepare_run_dir(out: Path) -> tuple[Path, DirLock]:
    """Create a new run directory, owned by this process (the lock returned); an existing non-empty one is
    never reused or overwritten, and one another process is starting in is refused."""
    if out.exists() and not _reusable(out):
        raise NinError(f"{out}: already exists; pass --resume {out} to continue it, or choose another --out")
    if str(out) in ("", "."):
        raise NinError("--out must name a new folder, got the current one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NinError(f"{out}: cannot write the run directory ({e.strerror or e})") from None
    lock = lock_run_dir(out)
    try:
        if not _reusable(out):  # another process got there first and has written to it since
            raise NinError(f"{out}: already exists; pass --resume {out} to continue it, or choose another --out")
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise NinError(f"{out}: cannot write the run directory ({e.strerror or e})") from None
    except BaseException:
        lock.release()
        raise
    return out, lock




@dataclass
class Result:
    history: list[dict[str, float]]
    run_dir: Path
    checkpoint: Path | None
    trainer: Trainer
    skipped: list[tuple[str, str]] = field(default_factory=list)  # image files left out as undecodable
    best: Path | None = None  # the checkpoint with the best test accuracy
    signals: list[int] = field(default_factory=list)  # SIGINT/SIGTERM received (handle_signals=True): stopped early


@dataclass
class _Start:
    """What the main process reads or creates before a run starts, shared with every process."""

    cfg: RunConfig
    run_dir: Path
    checkpoint: Path | None = None
    meta: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    note: str | None = None  # for the user, e.g. that a run without a checkpoint starts again


def _run_dir_of(resume: Path) -> Path:
    """The run directory of ``--resume PATH``: PATH itself, or the run a checkpoint folder belongs to."""
    check_dir(resume, error=ckpt.CheckpointError, what="checkpoint or run directory")
    return resume.parent.parent if os.path.lexists(resume / "meta.json") else resume


def _start(cfg: RunConfig, out, resume, keep: dict[str, Any] | None, locks: list[DirLock]) -> _Start:
    """Create the run directory, or read what a resumed run needs; the run directory's lock goes to ``locks``."""
    if resume is None:
        run_dir, lock = prepare_run_dir(Path(out) if out is not None else default_run_dir(cfg))
        locks.append(lock)
        return _Start(cfg, run_dir)
    run_dir = _run_dir_of(Path(resume))
    locks.append(lock_run_dir(run_dir))  # before anything is read: a run being trained is not resumed
    try:
        ck = ckpt.resolve(resume)
    except ckpt.NoCheckpoint:
        ck = None  # stopped before its first checkpoint: it starts again, with its saved settings
    saved = load_run_config(run_dir)
    if keep is None:  # the caller's cfg decides epochs, max_steps and device
        keep = {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps, "device": cfg.device}
    if keep.get("epochs") is not None:
        saved.train.epochs = keep["epochs"]
    saved.train.max_steps = keep.get("max_steps")  # a step limit applies to the command that set it
    if keep.get("device") is not None:
        saved.device = keep["device"]
    if ck is None:
        return _Start(saved, run_dir, note=f"{run_dir} has no checkpoint yet (it stopped before its first one): "
                                           "training it from the start with its saved settings")
    newest = ckpt.step_folders(run_dir)[-1]
    if ck.resolve() != newest.resolve():
        raise ckpt.CheckpointError(f"{ck}: not the run's newest checkpoint ({newest.name} is newer); resuming from "
                                   "it would rewrite the history after it: move the newer checkpoints out of "
                                   f"{run_dir / 'checkpoints'} first, or copy the run")
    meta = ckpt.read_meta(ck)
    name = (meta.get("model") or {}).get("name") if isinstance(meta.get("model"), dict) else None
    if name != saved.model.name:
        raise ckpt.CheckpointError(f"{ck}: holds a {name!r} model, the run is {saved.model.name!r}")
    return _Start(saved, run_dir, ck, meta, ckpt.load_state(ck, meta))


def train(
    cfg: RunConfig,
    out: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    keep: dict[str, Any] | None = None,
    callbacks: list[Callback] | None = None,
    progress: bool = True,
    handle_signals: bool = False,
    log: Callable[[str], None] | None = None,
) -> Result:
    """Train a run from ``cfg`` into a new run directory, or continue one with ``resume``.

    ``resume`` is a run directory (its latest checkpoint) or a checkpoint directory;
    the run continues in its own run directory with its saved configuration. ``keep``
    sets what may change: ``epochs`` and ``device`` (None: as saved) and ``max_steps``
    (None: no limit); without ``keep`` they are taken from ``cfg``.

    ``handle_signals``: SIGINT or SIGTERM stops the run after the current step with a
    checkpoint (``Result.signals`` lists them); a second signal stops at once. ``log`` receives
    notes for the user (a resumed run that had no checkpoint yet starts again).

    The run directory is owned by this call (a lock on the folder, see :func:`lock_run_dir`): another
    process training or resuming into it is refused with :class:`RunDirBusy`. Resuming takes the run's
    newest checkpoint; if that one is damaged, or an older one is named, it refuses rather than
    rewrite the run's history.

    Under ``torchrun`` (after :func:`nin.training.distributed.setup`) every process calls this:
    the main process creates the run directory or reads the checkpoint and shares it,
    and only it writes files.
    """
    locks: list[DirLock] = []  # the main process's hold on the run directory, until this returns
    try:
        return _train(cfg, out, resume, keep, callbacks, progress, handle_signals, log, locks)
    finally:
        for lock in locks:
            lock.release()


def _train(cfg, out, resume, keep, callbacks, progress, handle_signals, log, locks) -> Result:
    start = distributed.on_main(lambda: _start(cfg, out, resume, keep, locks))
    cfg, run_dir = start.cfg, start.run_dir
    if start.note and log is not None and distributed.is_main_process():
        log(start.note)
    if cfg.train.tensorboard:  # before the data is loaded: a missing package is one line, not a late traceback
        distributed.agree(require_tensorboard, run_here=distributed.is_main_process())
    built = build(cfg, init=start.checkpoint is None)
    if start.checkpoint is not None:
        # The main process checks and loads the weights; DistributedDataParallel copies them to the others.
        distributed.agree(lambda: ckpt.load_weights(start.checkpoint, built.model, start.meta),
                          run_here=distributed.is_main_process())

    device = built.train_loader.device
    doc = {"config": cfg.to_dict(), "env": environment(device) | {"processes": distributed.current().world_size}}
    if built.skipped:
        doc["skipped_images"] = [{"file": f, "reason": why} for f, why in built.skipped]

    def write_config() -> None:
        if built.whitening is not None and not (run_dir / WHITENING_FILE).exists():  # a resumed run keeps its own
            try:
                built.whitening.save(run_dir / WHITENING_FILE)
            except OSError as e:
                raise write_error(run_dir / WHITENING_FILE, e) from None
        write_text(run_dir / "config.json", json.dumps(doc, indent=1))

    checkpointer = Checkpointer(run_dir, built.meta, keep_last=cfg.checkpoint.keep_last,
                                every_steps=cfg.checkpoint.every_steps, resumed_from=start.checkpoint)
    cbs: list[Callback] = [ProgressBar(print_epochs=progress)] if progress else []
    cbs += [EMA(cfg.train.ema)] if cfg.train.ema > 0 else []
    cbs += [MetricsWriter(run_dir), RollbackLog(run_dir), CurvePlotter(run_dir, title=cfg.model.name)]
    if cfg.train.tensorboard:  # before the checkpointer: each checkpoint follows the points logged up to it
        cbs.append(TensorBoard(run_dir / TENSORBOARD_DIR, cfg.train.tensorboard_every,
                               hparams=hparams_of(cfg.to_dict()), classes=built.meta["data"]["classes"]))
    cbs += [checkpointer, *(callbacks or [])]
    trainer = Trainer(built.model, cfg.train, built.train_loader, built.test_loader, cbs)
    if start.state is not None:
        try:
            trainer.load_state_dict(start.state)
        except NinError as e:
            raise ckpt.CheckpointError(f"{start.checkpoint}: {e}") from None
    distributed.agree(write_config, run_here=distributed.is_main_process())  # once the state is known to fit
    signals: list[int] = []
    try:
        if handle_signals:
            with stop_on_signals(trainer) as signals:
                history = trainer.fit()
        else:
            history = trainer.fit()
    except Diverged as e:
        last = checkpointer.last_path
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise Diverged(e.step, e.epoch, e.loss, note=e.note + where) from None
    return Result(history, run_dir, checkpointer.last_path, trainer, built.skipped, checkpointer.best_path,
                  list(signals))


def summary_line(history: list[dict[str, float]], device: torch.device) -> str:
    """The seed's closing lines: last epoch's loss and accuracies, and examples/sec over all epochs."""
    last = history[-1]
    seconds = sum(h["epoch_time"] for h in history)
    examples = sum(h["examples_per_sec"] * h["epoch_time"] for h in history)
    test = f", test acc {last['test_acc']:.3f}" if "test_acc" in last else ""
    return (f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}{test}\n"
            f"{examples / max(seconds, 1e-9):.1f} examples/sec on {device}")


def result_lines(result: Result) -> tuple[list[str], list[str]]:
    """What ``nin train`` prints when a run has ended: (lines for standard output, lines for standard error).

    Images skipped as undecodable are a warning; a run stopped by a signal names the checkpoint and the command
    that continues it; a finished one gives the seed's summary, any rollbacks and where the run was written.
    """
    out: list[str] = []
    err: list[str] = []
    if result.skipped:
        names = ", ".join(f for f, _ in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else "")
        err.append(f"nin: warning: skipped {len(result.skipped)} undecodable image(s): {names} "
                   f"(listed in {result.run_dir / 'config.json'})")
    t = result.trainer
    if result.signals:
        err.append(f"stopped by {signal.Signals(result.signals[0]).name} at step {t.step} (epoch {t.epoch + 1}, "
                   f"batch {t.pos.batch}); checkpoint: {result.checkpoint}")
        err.append(f"to continue: nin train --resume {result.run_dir}")
    elif not result.history:
        out.append(f"stopped before the end of the first epoch; checkpoint: {result.checkpoint}")
    else:
        out += summary_line(result.history, t.device).splitlines()
        if t.rollbacks:
            out.append(f"rolled back {len(t.rollbacks)} time(s) after a non-finite loss; the learning rate ended "
                       f"x{t.lr_scale:g} (log: {result.run_dir / 'rollbacks.jsonl'})")
        best = f", best: {result.best}" if result.best is not None and result.best != result.checkpoint else ""
        out.append(f"run directory: {result.run_dir}  (checkpoint: {result.checkpoint}{best})")
    return out, err
