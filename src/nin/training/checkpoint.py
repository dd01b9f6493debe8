"""Checkpoints that load without executing anything from the file.

A checkpoint is a directory written atomically: built under a temporary name
next to its final place, every file flushed to disk, then renamed into place, so
a crash at any moment leaves either the whole new checkpoint or none of it, and
the previous checkpoints untouched:

- ``model.safetensors``: the weights and buffers;
- ``state.safetensors``: every tensor of the trainer state (optimizer buffers, RNG states);
- ``meta.json``: everything else (model name and options, data settings, the
  trainer's counters, history, where each tensor of the state goes) and the
  SHA-256 of both tensor files, checked on every load.

Nothing is unpickled: safetensors holds only tensors and JSON only plain values.
A run keeps its checkpoints in ``RUN/checkpoints/step-NNNNNNN/``; ``best`` there
is a symbolic link to the one with the highest test accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from nin.atomic import write_error
from nin.errors import NinError
from nin.files import check_dir, check_regular, open_regular, os_reason, read_json

FORMAT = "nin-checkpoint"
VERSION = 2  # 2: meta.json records the SHA-256 of the tensor files
READABLE = (1, 2)
TENSOR_FILES = ("model.safetensors", "state.safetensors")
BEST = "best"  # RUN/checkpoints/best -> step-NNNNNNN
FILES = ("model.safetensors", "state.safetensors", "meta.json")
MAX_META_BYTES = 64 * 2**20  # meta.json holds settings and history: a few kB to a few MB


class CheckpointError(NinError):
    """A checkpoint is missing, incomplete, tampered with or belongs to another model."""


class NoCheckpoint(CheckpointError):
    """A run directory holds no checkpoint yet (it stopped before its first one)."""


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


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every system can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(path: Path, e: OSError) -> CheckpointError:
    why = write_error(path, e).reason
    return CheckpointError(f"{path}: could not write the checkpoint ({why}); earlier checkpoints are intact")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a checkpoint directory at ``path``; an existing one is never overwritten.

    Written under a temporary name, flushed, then renamed: a failure (a full disk, a crash)
    leaves no partial checkpoint. An OSError becomes a :class:`CheckpointError` naming the path.
    """
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path}: already exists; refusing to overwrite it")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split(state, tensors, "s")
        save_file(tensors, tmp / "state.safetensors")
        files = {}
        for name in TENSOR_FILES:
            _fsync_file(tmp / name)
            data = (tmp / name).read_bytes()  # as the loader reads it: whole (the weights are in memory anyway)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        doc = {"format": FORMAT, "version": VERSION, **meta, "files": files, "state": skeleton}
        with open(tmp / "meta.json", "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories of checkpoints a crash interrupted; return them."""
    root = Path(run_dir) / "checkpoints"
    stale = [p for p in root.glob(".step-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def set_best(run_dir: str | os.PathLike, checkpoint: Path) -> Path:
    """Point ``RUN/checkpoints/best`` at ``checkpoint`` (atomically: a new link renamed over the old one)."""
    root = Path(run_dir) / "checkpoints"
    link, tmp = root / BEST, root / f".{BEST}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(checkpoint.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
        _fsync_dir(root)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(link, e) from None
    return link


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``RUN/checkpoints/best`` points at, if there is one and it is complete."""
    link = Path(run_dir) / "checkpoints" / BEST
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if _complete(target) else None


def _complete(path: Path) -> bool:
    """Whether checkpoint folder ``path`` holds each of its files as a regular file (links followed)."""
    return all((path / f).is_file() for f in FILES)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory, checked for format and completeness."""
    path = Path(path)
    check_dir(path, error=CheckpointError, what="checkpoint directory")
    missing = [f for f in FILES if not os.path.lexists(path / f)]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for f in FILES:  # a FIFO, a device, a folder or a dangling link in a file's place
        check_regular(path / f, error=CheckpointError)
    meta = read_json(path / "meta.json", MAX_META_BYTES, error=CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'meta.json'}: not a nin checkpoint")
    if meta.get("version") not in READABLE:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r} is not supported "
                              f"(this nin reads versions {', '.join(map(str, READABLE))})")
    if meta["version"] >= 2:
        files = meta.get("files")
        if not (isinstance(files, dict) and all(isinstance(files.get(f), dict)
                                                and isinstance(files[f].get("sha256"), str) for f in TENSOR_FILES)):
            raise CheckpointError(f"{path / 'meta.json'}: missing the checksums of {' and '.join(TENSOR_FILES)}")
    return meta


def _load_tensors(file: Path, meta: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The tensors in ``file``, after checking its size and SHA-256 against ``meta`` (version 2 checkpoints)."""
    record = ((meta or {}).get("files") or {}).get(file.name, {})
    with open_regular(file, error=CheckpointError) as f:
        size, declared = os.fstat(f.fileno()).st_size, record.get("bytes")
        if isinstance(declared, int) and not isinstance(declared, bool) and size != declared:
            raise CheckpointError(f"{file}: {size:,} bytes, meta.json recorded {declared:,} (the file was changed, "
                                  "truncated or replaced after it was saved)")
        try:
            data = f.read()
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read it ({os_reason(e)})") from None
    expected = record.get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{file}: contents do not match the checksum in meta.json "
                              "(the file was changed or damaged after it was saved)")
    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:  # the message may quote the file
        raise CheckpointError(f"{file}: unreadable safetensors file ({' '.join(str(e).split())})") from None


def load_weights(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's weights into ``model``; any mismatch is an error, never a partial load."""
    file = Path(path) / "model.safetensors"
    load_checked(model, _load_tensors(file, meta if meta is not None else read_meta(path)), file)


def load_checked(model: nn.Module, weights: dict[str, torch.Tensor], file: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)`` if every name, shape and dtype matches, else a CheckpointError naming
    ``file`` (nothing is loaded)."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{file}: the weights are not a table of tensors")
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
    if "state" not in meta:
        raise CheckpointError(f"{path / 'meta.json'}: no trainer state")
    tensors = _load_tensors(path / "state.safetensors", meta)
    try:
        state = _join(meta["state"], tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: state.safetensors lacks tensor {e}") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: malformed trainer state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'meta.json'}: the trainer state is a {type(state).__name__}, not a table")
    return state


def step_folders(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoints/step-N`` folder of a run, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``checkpoints/step-*``)."""
    return [p for p in step_folders(run_dir) if _complete(p)]


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint or run directory (the run's newest checkpoint).

    The newest checkpoint of a run is never skipped silently: if it is damaged (a file missing, not a
    regular file, or meta.json unreadable), this refuses, naming it and the newest intact one, which the
    user may then name. A run with no checkpoint at all is :class:`NoCheckpoint`.
    """
    path = Path(path)
    check_dir(path, error=CheckpointError, what="checkpoint or run directory")
    if os.path.lexists(path / "meta.json"):
        return path
    folders = step_folders(path)
    if not folders:
        raise NoCheckpoint(f"{path}: no checkpoint found (expected a checkpoint or run directory)")
    newest = folders[-1]
    try:
        read_meta(newest)
    except CheckpointError as e:
        intact = list_checkpoints(path)
        older = (f"the newest intact one is {intact[-1]}: name it to use it" if intact
                 else "no other checkpoint is intact")
        raise CheckpointError(f"{path}: its newest checkpoint is damaged ({e}); {older}, or move the damaged "
                              "one away") from None
    return newest
