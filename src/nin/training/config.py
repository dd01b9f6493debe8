"""Every setting of a run, in one schema: the config dataclasses, the presets, and reading them from a
mapping or a file.

:class:`RunConfig` holds a run's sections: :class:`ModelConfig`, :class:`~nin.data.DataConfig`,
:class:`TrainConfig` and :class:`CheckpointConfig`. :meth:`RunConfig.from_dict` refuses unknown keys and
values of the wrong type; :meth:`RunConfig.validate` checks every numeric setting against the range
declared with it (:mod:`nin.bounds`).

Configuration files (``nin train --config FILE``): a file is TOML (``.toml``), YAML (``.yaml``/``.yml``)
or JSON (``.json``, including a run directory's own ``config.json``, so any run can be repeated exactly).
It holds any part of a :class:`RunConfig`, laid out as its sections, and may name a preset to start from::

    preset = "d2l"            # optional; --preset on the command line wins
    seed = 1

    [model]
    name = "nin_d2l"
    options = { mlp_layers = 1 }

    [train]
    lr = 0.04
    epochs = 20
    batch_size = 64

Layers, later ones winning: the preset, the file, then command-line flags. Unknown
settings and values of the wrong type are one-line errors naming the setting.
"""

from __future__ import annotations

import copy
import json
import os
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from nin.bounds import bounded, check_ranges, setting
from nin.data import DataConfig
from nin.errors import NinError, did_you_mean
from nin.files import read_json, read_regular_text
from nin.models import DEFAULT_MODEL
from nin.training.precision import AMP_MODES, amp_choice


@dataclass
class TrainConfig:
    """Optimization settings. Defaults are the fast CPU recipe for ``nin28``."""

    epochs: int = bounded(3, 1, 10**6, help="passes over the training set")
    batch_size: int = bounded(128, 1, 2**20, help="training images per step")
    # any above 0: diverging is one of the exercises
    lr: float = bounded(0.2, 0, lo_open=True, help="peak learning rate")
    momentum: float = bounded(0.9, 0, 1, hi_open=True, help="SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = bounded(5e-4, 0, 1, help="L2 weight decay")
    schedule: Literal["constant", "cosine", "onecycle", "step"] = setting("onecycle", "learning-rate schedule")
    warmup: float = bounded(0.2, 0, 1, hi_open=True, help="fraction of steps spent warming up (cosine, onecycle, "
                                                          "step)")
    milestones: tuple[float, ...] = bounded((0.5, 0.75), 0, 1, lo_open=True, hi_open=True,
                                            help="step schedule: fractions of the run where the lr drops, e.g. "
                                                 "0.5,0.75")
    gamma: float = bounded(0.1, 0, 1, lo_open=True, help="step schedule: factor applied at each milestone "
                                                          "(default 0.1)")
    label_smoothing: float = bounded(0.1, 0, 1, hi_open=True, help="cross-entropy label smoothing")
    ema: float = bounded(0.0, 0, 1, hi_open=True,
                         help="keep an exponential moving average of the weights with this decay per step (e.g. "
                              "0.999), evaluated, checkpointed and used for inference in their place (default 0: "
                              "off)")
    tta: bool = setting(False, "evaluate each epoch with horizontal-flip test-time augmentation: the mean of the "
                               "predictions on each test image and its mirror image (the reported test accuracy is "
                               "that of the averaged predictions; nin evaluate and nin predict take --tta to match)")
    # Speed. "auto"/None pick per device (see resolved() and amp_choice()): on CUDA, bf16 where the GPU has
    # it natively (compute capability 8.0+), else fp16 with a gradient scaler, plus channels_last and compile;
    # on a CPU, bf16 only where oneDNN runs it natively, channels_last always, no compile.
    amp: Literal["auto", "none", "bf16", "fp16"] = setting(
        "auto", "mixed precision; auto (default): bf16 where the device runs it natively (GPUs of compute capability "
                "8.0+, CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older GPUs, else none (fp32); "
                "`nin doctor` says what it picks here and why")
    channels_last: bool | None = setting(None, "NHWC memory format (default on)")
    compile: bool | None = setting(None, "torch.compile the model (default: on for CUDA, off on CPUs)")
    # False: the per-parameter loop
    fused: bool = setting(True, "fused optimizer step: one kernel for all parameters (default on)")
    fold_bn: bool = setting(True, "evaluate with BatchNorm folded into the convolutions (default on)")
    # the schedule still spans all epochs
    max_steps: int | None = bounded(None, 1, 10**12, help="stop after N optimizer steps (smoke runs)")
    eval_batch_size: int = bounded(1000, 1, 2**20, help="test images per evaluation batch")
    # steps between loss finiteness checks; None: 1 on CPU, 50 on GPU (each syncs)
    check_every: int | None = bounded(None, 1, 10**6)
    # A non-finite loss: "stop" raises Diverged; "rollback" restores the state at the start of the epoch,
    # multiplies the learning rate by rollback_factor from then on, and redoes the epoch (at most max_rollbacks).
    on_diverge: Literal["stop", "rollback"] = setting(
        "stop", "a NaN/inf loss: stop (default), or roll back to the epoch's start with a lower lr")
    rollback_factor: float = bounded(0.5, 0, 1, lo_open=True, hi_open=True,
                                     help="rollback: multiply the lr by this (default 0.5)")
    max_rollbacks: int = bounded(3, 1, 100, help="rollback: give up after N (default 3)")
    # Logging only: neither changes the training (nin.training.callbacks.tensorboard).
    tensorboard: bool = setting(False, "live curves for TensorBoard in RUN/tensorboard/: step and epoch metrics, "
                                       "class maps of test images, the settings (default off; needs the "
                                       "tensorboard package)")
    tensorboard_every: int = bounded(50, 1, 10**6, metavar="N",
                                     help="--tensorboard: step metrics every N steps (default 50; each reads the "
                                          "loss from the device)")
    # Distributed runs only: BatchNorm statistics over the global batch (SyncBatchNorm) rather than each
    # process's slice. None: on for GPUs; PyTorch's SyncBatchNorm does not run on CPUs.
    sync_bn: bool | None = None

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise NinError(msg)

        check_ranges(self)  # every numeric setting against the range declared with it
        if self.nesterov and self.momentum == 0:
            bad("nesterov needs a non-zero momentum")
        if self.schedule not in ("constant", "cosine", "onecycle", "step"):
            bad(f"unknown schedule {self.schedule!r}; choose constant, cosine, onecycle or step")
        if list(self.milestones) != sorted(self.milestones):
            bad(f"milestones must be increasing fractions of the run in (0, 1), got {list(self.milestones)}")
        if self.amp not in AMP_MODES:
            bad(f"unknown amp mode {self.amp!r}; choose {', '.join(AMP_MODES)}")
        if self.on_diverge not in ("stop", "rollback"):
            bad(f"unknown on_diverge {self.on_diverge!r}; choose stop or rollback")

    def resolved(self, device: torch.device) -> TrainConfig:
        """A copy with the automatic speed settings made concrete for ``device``."""
        cuda = device.type == "cuda"
        return replace(
            self,
            amp=amp_choice(device)[0] if self.amp == "auto" else self.amp,
            channels_last=True if self.channels_last is None else self.channels_last,
            compile=cuda if self.compile is None else self.compile,
            sync_bn=cuda if self.sync_bn is None else self.sync_bn,
        )


SPEED = ("amp", "channels_last", "compile", "fused", "fold_bn")  # TrainConfig's speed switches


@dataclass
class ModelConfig:
    name: str = setting(DEFAULT_MODEL, "registered model name (see `nin models`)", flags=("--model",))
    options: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    # applied once, when the model is first built
    init: Literal["xavier", "kaiming", "default"] = setting("kaiming", "weight initialization")


@dataclass
class CheckpointConfig:
    # also save every N steps inside an epoch (besides each epoch's end)
    every_steps: int | None = bounded(None, 1, 10**12, flags=("--checkpoint-every",), metavar="N",
                                      help="also save a checkpoint every N steps inside an epoch (default: at "
                                           "each epoch's end only)")
    keep_last: int = bounded(3, 0, 10**6, metavar="N",
                             help="keep the newest N checkpoints (default 3; 0 keeps all); the best one is always "
                                  "kept")

    def validate(self) -> None:
        check_ranges(self)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = bounded(0, 0, 2**32 - 1, help="seed of the weights, the data order and the augmentation")
    device: str = setting("auto", "auto, cpu or cuda[:N] (default auto)")

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
#: ``nin-cifar10`` is the paper's CIFAR-10 setting; ``fast`` and ``best`` are the strongest Fashion-MNIST recipes
#: for a time budget and for accuracy (docs/accuracy.md).
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
    # Accuracy for a few minutes of a 2-core bf16 CPU: the default recipe on nin28 for 18 epochs, without label
    # smoothing and scored with flip TTA; about 3.2 minutes with data loading on a cpu-amx (docs/accuracy.md).
    # Chosen on 5,000 held-out training images (the ablation in docs/accuracy.md): at equal time the narrow nin28
    # trained for more epochs beat the wider nin28_s for fewer, random erasing cost 0.6 points at this length,
    # and label smoothing off plus TTA gave +0.48 points. `--epochs 8` is the 90-second version.
    "fast": RunConfig(train=TrainConfig(epochs=18, label_smoothing=0.0, tta=True)),
    # Accuracy per parameter, not per second: nin28_m (459,594 parameters) for 30 epochs with random crops, flips,
    # random erasing and an EMA of the weights (evaluated and deployed in their place). See docs/accuracy.md for
    # what it reaches; about 20 minutes a seed on a 2-core bf16 CPU.
    "best": RunConfig(model=ModelConfig("nin28_m"), data=DataConfig(crop_padding=2, flip=True, erase=0.5),
                      train=TrainConfig(epochs=30, ema=0.999)),
}


def preset(name: str) -> RunConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise NinError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def setting_paths(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted setting of a :class:`RunConfig` (``"train.lr"``, ``"seed"``, ...), as :func:`override` takes
    them; ``model.options.*`` take any option name the model accepts."""
    cls = cls or RunConfig
    paths = []
    for f in fields(cls):
        default = getattr(cls(), f.name)
        paths += setting_paths(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [prefix + f.name]
    return paths


def override(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with dotted-path ``changes`` applied: ``{"train.lr": 0.1, "seed": 1,
    "model.options.width": 0.5}``. The one way settings are changed, by flags, studies and tuning alike.

    Each value is type-checked as :meth:`RunConfig.from_dict` does (a list for a tuple, an int for a float);
    an unknown setting is a one-line error with a suggestion. A new ``model.name`` starts from no options, as
    another model's options would not fit it. Ranges are checked once, by :meth:`RunConfig.validate`.
    """
    doc = cfg.to_dict()
    known = setting_paths()
    if "model.name" in changes and changes["model.name"] != doc["model"]["name"]:
        doc["model"]["options"] = {}
    for path, value in changes.items():
        *parents, key = path.split(".")
        if path not in known and parents[:2] != ["model", "options"]:
            raise NinError(f"no setting {path!r}{did_you_mean(path, known)}")
        node = doc
        for p in parents:
            node = node[p]
        node[key] = list(value) if isinstance(value, tuple) else value
    return RunConfig.from_dict(doc)


def load_run_config(run_dir: Path) -> RunConfig:
    file = run_dir / "config.json"
    if not os.path.lexists(file):
        raise NinError(f"{run_dir}: not a run directory (no config.json)")
    doc = read_json(file, MAX_CONFIG_BYTES, error=NinError)
    if not isinstance(doc, dict):
        raise NinError(f"{file}: not a run configuration (expected a JSON object)")
    try:
        return RunConfig.from_dict(doc.get("config", {}))
    except NinError as e:
        raise NinError(f"{file}: {e}") from None


SUFFIXES = (".toml", ".yaml", ".yml", ".json")
MAX_CONFIG_BYTES = 16 * 2**20  # a config file holds settings: a few kB


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a config file holds; a run's config.json gives its ``config`` part."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise NinError(f"{path}: unknown config format {path.suffix or '(no suffix)'!r}; use .toml, .yaml or .json")
    text = read_regular_text(path, MAX_CONFIG_BYTES)  # a FIFO or a device is named, never read from
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            doc = tomllib.loads(text)
        elif suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text) or {}
    except Exception as e:  # each parser has its own error class; all are a user's malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NinError(f"{path}: not valid {suffix.lstrip('.').upper()}: {first}") from None
    if not isinstance(doc, dict):
        raise NinError(f"{path}: expected a table of settings at the top, got {type(doc).__name__}")
    if suffix == ".json" and "config" in doc and "env" in doc:  # a run directory's config.json
        doc = doc["config"]
    return doc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike[str], preset_name: str | None = None) -> RunConfig:
    """The preset (``preset_name``, else the file's ``preset``, else ``default``) overlaid with the file."""
    doc = read_config_file(path)
    named = doc.pop("preset", None)
    if named is not None and named not in PRESETS:
        raise NinError(f"{path}: unknown preset {named!r} (available: {', '.join(PRESETS)})")
    base = preset(preset_name or named or "default").to_dict()
    model = doc.get("model")
    if isinstance(model, dict) and model.get("name", base["model"]["name"]) != base["model"]["name"]:
        base["model"]["options"] = {}  # another model: the preset's options were for its own
    try:
        return RunConfig.from_dict(_merge(base, doc))
    except NinError as e:
        raise NinError(f"{path}: {e}") from None
