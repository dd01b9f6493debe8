"""What a trained model is, for the people who use it: its card.

Name, parameters, data set, classes, the input it is given (channels and the stored size an image is decoded
to), the run's test accuracy at this checkpoint and the date it was trained. ``nin serve`` answers
``GET /v1/model`` with it, and ``nin export`` writes it into an exported file's sidecar, so that a server of
the exported file says the same. The run's records are read as they are: a missing or unreadable
``metrics.jsonl`` or ``config.json`` gives null, never an error (a checkpoint moved out of its run has none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from nin.errors import NinError
from nin.files import read_regular_text

MAX_RECORD_BYTES = 64 * 2**20  # a run's config.json and metrics.jsonl: kilobytes
VERSION_HEX = 12  # a model's version: the first 12 hex digits of its weights file's SHA-256


def file_version(path: str | os.PathLike) -> str:
    """The first :data:`VERSION_HEX` hex digits of the SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:VERSION_HEX]


def model_card(trained) -> dict[str, Any]:
    """The card of a :class:`~nin.inference.trained.Trained` model (its ``version`` from model.safetensors)."""
    channels, (height, width) = trained.stored_shape()
    accuracy, date = run_record(trained.path, holdout=trained.config.data.holdout is not None)
    return {"name": trained.name, "version": file_version(trained.path / "model.safetensors"),
            "parameters": sum(p.numel() for p in trained.model.parameters()), "dataset": trained.dataset,
            "classes": list(trained.classes), "input": {"channels": channels, "height": height, "width": width},
            "test_accuracy": accuracy,
            # the run scored its test images with flip TTA (train.tta): a single forward pass scores a little lower
            "test_accuracy_tta": trained.config.train.tta, "trained": date}


def run_record(checkpoint: Path, *, holdout: bool = False) -> tuple[float | None, str | None]:
    """The test accuracy the run recorded at ``checkpoint``'s step (``metrics.jsonl``) and the date it was
    trained (``config.json``, ISO ``YYYY-MM-DD``), each None when unknown. A run evaluated on held-out
    training images (``holdout``) recorded no test accuracy."""
    real = Path(checkpoint).resolve()  # checkpoints/best is a link to a step folder
    run = real.parent.parent if real.parent.name == "checkpoints" else None
    if run is None:
        return None, None
    step = int(real.name[5:]) if real.name.startswith("step-") and real.name[5:].isdigit() else None
    accuracy = None if holdout or step is None else _accuracy_at(run / "metrics.jsonl", step)
    return accuracy, _trained_on(run / "config.json")


def _read(path: Path) -> str | None:
    try:
        return read_regular_text(path, MAX_RECORD_BYTES)
    except NinError:
        return None


def _accuracy_at(path: Path, step: int) -> float | None:
    """The last ``test_acc`` recorded at ``step`` in ``metrics.jsonl`` (a resumed run may repeat a step)."""
    text = _read(path)
    found = None
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step") != step:
            continue
        acc = row.get("test_acc")
        if isinstance(acc, (int, float)) and not isinstance(acc, bool) and math.isfinite(acc) and 0 <= acc <= 1:
            found = float(acc)
    return found


def _trained_on(path: Path) -> str | None:
    """The date of ``env.date`` in a run's ``config.json``, as ``YYYY-MM-DD``."""
    text = _read(path)
    try:
        date = json.loads(text)["env"]["date"] if text else None
        return dt.date.fromisoformat(date[:10]).isoformat() if isinstance(date, str) else None
    except (ValueError, KeyError, TypeError):
        return None
