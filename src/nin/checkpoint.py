"""Checkpoints that load without executing anything from the file.

A checkpoint is a directory written atomically (built under a temporary name,
then renamed into place):

- ``model.safetensors``: the weights and buffers;
- ``state.safetensors``: every tensor of the trainer state (optimizer buffers, RNG states);
- ``meta.json``: everything else (model name and options, data settings, the
  trainer's counters, history, and where each tensor of the state goes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nin.errors import NinError

FORMAT = "nin-checkpoint"
VERSION = 1
FILES = ("model.safetensors", "state.safetensors", "meta.json")


class CheckpointError(NinError):
    """A checkpoint is missing, incomplete, tampered with or belongs to another model."""


def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace each tensor in a nested structure by ``{"__tensor__": key}``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, tensors, f"{prefix}.k{i}"), _split(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | os.PathLike, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a checkpoint directory at ``path``; an existing one is never overwritten."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split(state, tensors, "s")
        save_file(tensors, tmp / "state.safetensors")
        doc = {"format": FORMAT, "version": VERSION, **meta, "state": skeleton}
        with open(tmp / "meta.json", "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory, checked for format and completeness."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'meta.json'}: not a nin checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported (expected {VERSION})")
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:  # the message may quote the file's text, newlines too
        raise CheckpointError(f"{file}: unreadable safetensors file ({' '.join(str(e).split())})") from None


def load_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load a checkpoint's weights into ``model``; any mismatch is an error, never a partial load."""
    file = Path(path) / "model.safetensors"
    weights = _load_tensors(file)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{file}: does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{file}: {k} is {v.dtype} {tuple(v.shape)}, "
                f"the model expects {expected[k].dtype} {tuple(expected[k].shape)}"
            )
    model.load_state_dict(weights)


def load_state(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer state saved with a checkpoint."""
    path = Path(path)
    meta = meta or read_meta(path)
    tensors = _load_tensors(path / "state.safetensors")
    if "state" not in meta:
        raise CheckpointError(f"{path / 'meta.json'}: no trainer state")
    try:
        state = _join(meta["state"], tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: state.safetensors lacks tensor {e}") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: malformed trainer state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'meta.json'}: the trainer state is a {type(state).__name__}, not a table")
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``checkpoints/step-*``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint or run directory (the run's latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected a checkpoint or run directory)")
    return found[-1]
