"""A training run: its configuration, presets, and the wiring from config to trainer.

:class:`RunConfig` is everything that defines a run. :func:`build` turns it into
a model and two device-resident loaders; :func:`train` adds a run directory
(``config.json``, metrics, curves, checkpoints) and runs the trainer.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import platform
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from nin import checkpoint as ckpt
from nin import distributed
from nin.atomic import write_error, write_text
from nin.bounds import bounded, check_ranges
from nin.callbacks import Checkpointer, CurvePlotter, MetricsWriter, ProgressBar, RollbackLog
from nin.datasets import DataConfig, image_shape, load_splits
from nin.errors import NinError
from nin.files import DirLock, check_dir, read_regular_text
from nin.loader import Augment, DeviceLoader, channel_stats
from nin.models import DEFAULT_MODEL, create_model, init_weights, model_entry
from nin.train import Callback, Diverged, TrainConfig, Trainer, stop_on_signals


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    options: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    init: str = "kaiming"  # applied once, when the model is first built


@dataclass
class CheckpointConfig:
    # also save every N steps inside an epoch (besides each epoch's end)
    every_steps: int | None = bounded(None, 1, 10**12)
    keep_last: int = bounded(3, 0, 10**6)  # newest checkpoints kept (0: all); the best one is kept as well

    def validate(self) -> None:
        check_ranges(self)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = bounded(0, 0, 2**32 - 1)
    device: str = "auto"

    def validate(self) -> None:
        """Every setting against its range (the flags are checked as they are parsed; a config file here)."""
        check_ranges(self)
        self.data.validate()
        self.train.validate()
        self.checkpoint.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d)


def _from_dict(cls, d: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    name = where or cls.__name__
    if not isinstance(d, dict):
        raise NinError(f"{name}: expected a table of settings, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise NinError(f"unknown {name} setting(s): {', '.join(unknown)} (known: {', '.join(known)})")
    hints = get_type_hints(cls)
    kw = {}
    for key, value in d.items():
        default = getattr(cls(), key)
        path = f"{where}.{key}" if where else key
        kw[key] = _from_dict(type(default), value, path) if is_dataclass(default) else _typed(value, hints[key], path)
    return cls(**kw)


def _typed(value: Any, hint: Any, path: str) -> Any:
    """``value`` if it fits type ``hint`` (ints pass as floats, lists as tuples), else a one-line NinError."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, path)
            except NinError as e:
                errors.append(str(e))
        raise NinError(errors[0])
    if origin is Literal:
        if value in args:
            return value
        raise NinError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise NinError(f"{path} must be {expected}, got {value!r}")


#: Named recipes. ``default`` is the fast 28x28 CPU recipe; ``d2l`` is the seed's, exactly;
#: ``nin-cifar10`` is the paper's CIFAR-10 setting.
PRESETS: dict[str, RunConfig] = {
    "default": RunConfig(),
    "d2l": RunConfig(
        model=ModelConfig("nin_d2l", init="xavier"),
        data=DataConfig(resize=224, normalize=False, crop_padding=0, flip=False),
        train=TrainConfig(
            epochs=10, batch_size=128, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
            schedule="constant", warmup=0.0, label_smoothing=0.0, eval_batch_size=256,
            amp="none",  # the seed trains in fp32
        ),
    ),
    # The authors' CIFAR-10 network and recipe: SGD with momentum 0.9, base lr 0.1, weight decay 1e-4, the
    # lr divided by 10 twice, dropout in the network, random crops (4-pixel translation) and flips.
    # The paper reports 8.81% test error (91.19% accuracy) with this augmentation.
    "nin-cifar10": RunConfig(
        model=ModelConfig("nin_cifar10", init="xavier"),  # Kaiming init at lr 0.1 hit NaN within 6 steps (no BN)
        data=DataConfig(dataset="cifar10", crop_padding=4, flip=True),
        train=TrainConfig(
            epochs=120, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
            schedule="step", milestones=(0.5, 0.75), gamma=0.1, warmup=0.02, label_smoothing=0.0,
        ),
    ),
}


def preset(name: str) -> RunConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise NinError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def configure_runtime(threads: int | None = None) -> None:
    """Thread and allocator set-up for the process, before any work.

    CPU: one compute thread per core this process may run on (``threads`` overrides),
    never more, so a container's CPU limit is not oversubscribed. CUDA: the caching
    allocator grows segments in place (``expandable_segments``) instead of keeping
    many fixed blocks, unless ``PYTORCH_CUDA_ALLOC_CONF`` is already set.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    n = compute_threads(threads)
    if threads or n != torch.get_num_threads():
        torch.set_num_threads(n)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all logical CPUs where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compute_threads(threads: int | None = None) -> int:
    """The compute threads :func:`configure_runtime` runs with, without setting them: ``threads`` when
    given, else torch's own count capped at :func:`usable_cpus`."""
    return threads or min(torch.get_num_threads(), usable_cpus())


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here; in a distributed run, ``auto``/``cuda`` is this process's local-rank GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NinError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NinError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    env = distributed.current()
    if env.distributed and device.type == "cuda":
        if device.index is not None:
            raise NinError(f"--device {name} names one GPU; in a distributed run each process takes the GPU of "
                           "its LOCAL_RANK: pass --device cuda")
        device = torch.device("cuda", env.local_rank)
    return device


@dataclass
class Built:
    """What :func:`build` returns."""

    model: nn.Module
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    meta: dict[str, Any]  # what a checkpoint needs to rebuild the model and its input pipeline
    skipped: list[tuple[str, str]] = field(default_factory=list)  # image files left out as undecodable
    whitening: Any = None  # the fitted nin.whiten.Whitening with --whiten


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
        from nin.whiten import fit_whitening

        whitening = fit_whitening(x_train, seed=cfg.seed).to(device)
    common = dict(size=size, mean=mean, std=std, whiten=whitening,
                  channels_last=cfg.train.resolved(device).channels_last)
    # Every process holds the training set and takes its own slice of each global batch (batch_size each);
    # the test set is cut into one contiguous share per process, and the evaluation sums are all-reduced.
    train_loader = DeviceLoader(
        x_train.to(device), y_train.to(device), cfg.train.batch_size, shuffle=True, seed=cfg.seed,
        augment=Augment(d.crop_padding, d.flip), rank=env.rank, world_size=env.world_size, **common,
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


MAX_CONFIG_BYTES = 64 * 2**20


def load_run_config(run_dir: Path) -> RunConfig:
    file = run_dir / "config.json"
    if not os.path.lexists(file):
        raise NinError(f"{run_dir}: not a run directory (no config.json)")
    text = read_regular_text(file, MAX_CONFIG_BYTES, error=NinError)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise NinError(f"{file}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise NinError(f"{file}: not a run configuration (expected a JSON object)")
    try:
        return RunConfig.from_dict(doc.get("config", {}))
    except NinError as e:
        raise NinError(f"{file}: {e}") from None


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

    Under ``torchrun`` (after :func:`nin.distributed.setup`) every process calls this:
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
    cbs += [MetricsWriter(run_dir), RollbackLog(run_dir), CurvePlotter(run_dir, title=cfg.model.name), checkpointer,
            *(callbacks or [])]
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


@dataclass
class Trained:
    """A model rebuilt from a checkpoint, with what its input pipeline needs."""

    model: nn.Module
    path: Path  # the checkpoint directory
    name: str  # the registered model name
    dataset: str
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    config: RunConfig  # the run's configuration (its data settings rebuild the test split)
    whitening: Any = None  # nin.whiten.Whitening of a --whiten run, applied instead of mean/std

    def stored_shape(self) -> tuple[int, tuple[int, int]]:
        """Channels and (H, W) of the run's images as stored, before its pipeline resizes them:
        the data set's own size (28x28 for Fashion-MNIST), or the model's for an image folder."""
        shape = image_shape(self.dataset)
        return self.model.input_size[0], (tuple(shape[1:]) if shape else tuple(self.size))

    def test_split(self, data_dir: str | None = None):
        """The run's test images (uint8, stored size) and labels, as its training run held them out."""
        data = copy.deepcopy(self.config.data)
        if data_dir:
            data.data_dir = data_dir
        channels, size = self.stored_shape()
        return load_splits(data, channels=channels, size=size, seed=SPLIT_SEED, splits=("test",))[0]["test"]

    def loader(self, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256) -> DeviceLoader:
        """uint8 images (stored size) in batches through the run's own pipeline (resize, normalize or whiten)."""
        device = next(self.model.parameters()).device
        if labels is None:
            labels = torch.zeros(len(images), dtype=torch.long)
        return DeviceLoader(images.to(device), labels.to(device), batch_size, size=self.size, mean=self.mean,
                            std=self.std, whiten=self.whitening)


def _pipeline_meta(d: dict[str, Any], model: nn.Module, where: Path) -> tuple:
    """The data set, input size, mean, std and class names that ``meta.json``'s ``data`` table gives, checked as a
    whole against the model it describes: the checksums prove the file intact, not that it makes sense.
    Anything else is one :class:`~nin.checkpoint.CheckpointError` naming the field."""
    def bad(field: str, why: str) -> ckpt.CheckpointError:
        return ckpt.CheckpointError(f"{where}: data.{field} {why}")

    def numbers(field: str) -> tuple[float, ...]:
        v = d.get(field)
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in v):
            raise bad(field, f"must be a list of finite numbers, got {_shown(v)}")
        if len(v) not in (1, channels):
            raise bad(field, f"has {len(v)} values; the model takes {channels} channel(s) (1 value, or one each)")
        return tuple(float(x) for x in v)

    channels, size = model.input_size[0], tuple(model.input_size[1:])
    dataset = d.get("dataset")
    if not isinstance(dataset, str):
        raise bad("dataset", f"must be a data set name, got {_shown(dataset)}")
    try:
        image_shape(dataset)
    except NinError as e:
        raise bad("dataset", f"is not usable ({e})") from None
    stored = d.get("size")
    if stored != list(size):
        raise bad("size", f"is {_shown(stored)}; the model it describes takes {size[0]}x{size[1]} input")
    mean, std = numbers("mean"), numbers("std")
    if not all(s > 0 for s in std):
        raise bad("std", f"must be positive (it divides every input), got {list(std)}")
    classes = d.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise bad("classes", f"must be a list of class names, got {_shown(classes)}")
    if len(classes) != model.num_classes:
        raise bad("classes", f"names {len(classes)} classes; the model has {model.num_classes} outputs")
    if len(set(classes)) != len(classes):
        raise bad("classes", "names a class twice")
    if d.get("whitening") not in (None, WHITENING_FILE):
        raise bad("whitening", f"must be {WHITENING_FILE!r} or null, got {_shown(d.get('whitening'))}")
    return dataset, size, mean, std, list(classes)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_trained(checkpoint: str | os.PathLike, device: str = "auto") -> Trained:
    """Rebuild the model saved in a checkpoint (or a run's latest one) on ``device``, in eval mode."""
    path = ckpt.resolve(checkpoint)
    meta = ckpt.read_meta(path)
    where = path / "meta.json"
    try:
        m, d = meta["model"], meta["data"]
        if not isinstance(m, dict) or not isinstance(d, dict):
            raise TypeError("'model' and 'data' must be tables")
        name, options = m["name"], m.get("options", {})
        if not isinstance(name, str) or not isinstance(options, dict):
            raise TypeError("'model': a name and a table of options")
        config = RunConfig.from_dict(meta.get("config") or {"data": {"dataset": d["dataset"]}})
        config.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{where}: missing or malformed field {e}") from None
    except NinError as e:  # (its message may quote the file's text, newlines too)
        raise ckpt.CheckpointError(f"{where}: {' '.join(str(e).split())}") from None
    try:  # first without memory: the sizes meta.json declares must fit in model.safetensors
        with torch.device("meta"):
            declared = create_model(name, **options)
    except (NinError, TypeError, ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())
        raise ckpt.CheckpointError(f"{where}: cannot build the model it describes ({why})") from None
    info = _pipeline_meta(d, declared, where)  # the input pipeline it describes must be this model's
    need = sum(t.numel() * t.element_size() for t in declared.state_dict().values())
    if need > (have := (path / "model.safetensors").stat().st_size):
        raise ckpt.CheckpointError(f"{path / 'model.safetensors'}: {have} bytes, too few for the {need} bytes of "
                                   "weights meta.json declares (truncated, or not this model's)")
    model = create_model(name, **options)
    ckpt.load_weights(path, model, meta)
    dev = resolve_device(device)
    whitening = None
    if d.get("whitening"):
        from nin.whiten import Whitening

        try:
            whitening = Whitening.load(path.parent.parent / WHITENING_FILE).to(dev)
        except NinError as e:
            raise ckpt.CheckpointError(f"{where}: {' '.join(str(e).split())}") from None
    return Trained(model.to(dev).eval(), path, name, *info, config, whitening)


def summary_line(history: list[dict[str, float]], device: torch.device) -> str:
    """The seed's closing lines: last epoch's loss and accuracies, and examples/sec over all epochs."""
    last = history[-1]
    seconds = sum(h["epoch_time"] for h in history)
    examples = sum(h["examples_per_sec"] * h["epoch_time"] for h in history)
    test = f", test acc {last['test_acc']:.3f}" if "test_acc" in last else ""
    return (f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}{test}\n"
            f"{examples / max(seconds, 1e-9):.1f} examples/sec on {device}")
