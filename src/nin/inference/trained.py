"""A trained model rebuilt from a checkpoint, with its input pipeline: what predict, evaluate, cam and export
start from."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nin.data import image_shape, load_splits
from nin.data.loader import DeviceLoader
from nin.errors import NinError
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.callbacks.ema import averaged_weights
from nin.training.config import RunConfig
from nin.training.run import SPLIT_SEED, WHITENING_FILE
from nin.training.runtime import resolve_device


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
    whitening: Any = None  # nin.data.whiten.Whitening of a --whiten run, applied instead of mean/std

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
    Anything else is one :class:`~nin.training.checkpoint.CheckpointError` naming the field."""
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
    """Rebuild the model saved in a checkpoint (or a run's latest one) on ``device``, in eval mode: with the
    run's averaged weights when it kept an EMA (``train.ema``), as those are the ones it evaluated."""
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
    if config.train.ema > 0:  # the weights the run evaluated, and so the ones to deploy, are the average
        averaged = averaged_weights(ckpt.load_state(path, meta))
        if averaged is not None:
            ckpt.load_checked(model, averaged, path / "state.safetensors")
    dev = resolve_device(device)
    whitening = None
    if d.get("whitening"):
        from nin.data.whiten import Whitening

        try:
            whitening = Whitening.load(path.parent.parent / WHITENING_FILE).to(dev)
        except NinError as e:
            raise ckpt.CheckpointError(f"{where}: {' '.join(str(e).split())}") from None
    return Trained(model.to(dev).eval(), path, name, *info, config, whitening)
