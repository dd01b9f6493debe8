"""Classify image files with a trained model: ``nin predict``.

Each file (PNG, JPEG, ... of any size and mode) is decoded the way the model's
training images were: to the data set's channels and stored size (28x28 for
Fashion-MNIST; the model's input size for an image folder), centre-cropped to that
aspect ratio. Then the run's own input pipeline resizes and normalizes (or
whitens) the batch on the device, exactly as it did for training and evaluation.

A file that is not a regular file (a FIFO, a device, a loop of symbolic links)
or whose header declares more pixels than the cap
(:data:`nin.data.folder.MAX_PIXELS`, or ``max_pixels``) is reported by name and what
it is, never read: it cannot block or fill memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nin.errors import NinError
from nin.inference.tta import tta_probabilities

FIT = "crop"  # how an image of another aspect ratio is brought to the stored size (as folder data sets are)


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first

    def to_dict(self) -> dict:
        return {"file": self.file, "top": [{"class": c, "probability": p} for c, p in self.top]}


def expand(paths: list[str]) -> list[Path]:
    """The image files named, with folders replaced by the image files under them (sorted).

    Nothing is opened here: a named path that is not a folder is kept, and so is anything under a folder
    with an image file's name that is not a folder itself (a FIFO, a broken link), so that :func:`decode`
    reports it by name and what it is, rather than passing over it in silence.
    """
    from nin.data.folder import _is_image_name

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if _is_image_name(f.name) and not f.is_dir())
            if not found:
                raise NinError(f"{p}: no image files in this folder")
            files += found
        else:
            files.append(p)  # a missing or unreadable file is reported with the others
    return files


def decode(files: list[Path], channels: int, size: tuple[int, int], max_pixels: int | None = None):
    """uint8 ``[N, C, H, W]`` of the files that decode, their paths, and (path, reason) for those that do not.

    Each file is opened as a regular file only (a reason names what else it is: "a FIFO (named pipe), not a
    regular file", "no such file or directory"); an image of more than ``max_pixels`` pixels (None:
    :data:`nin.data.folder.MAX_PIXELS`) is refused before it is decoded. A bad ``max_pixels`` is a NinError.
    """
    from nin.data.images import DECODE_ERRORS, _decode_reason, decode_image, pixel_cap

    cap = pixel_cap(max_pixels)
    arrays, good, bad = [], [], []
    for f in files:
        try:
            arrays.append(decode_image(f, channels, size, FIT, cap))
            good.append(f)
        except DECODE_ERRORS as e:
            bad.append((f, _decode_reason(e)))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, channels, *size, dtype=torch.uint8)
    return images, good, bad


@torch.inference_mode()
def predict_files(trained, paths: list[str | os.PathLike], top_k: int = 5, batch_size: int = 256,
                  max_pixels: int | None = None, *, tta: bool = False):
    """Top-``top_k`` classes of each readable file; returns (predictions, [(file, reason), ...]).

    ``max_pixels`` caps each image's pixels (None: :data:`nin.data.folder.MAX_PIXELS`), as in :func:`decode`.
    ``tta``: the probabilities averaged over each image and its mirror image (:mod:`nin.inference.tta`).
    """
    if top_k < 1:
        raise NinError(f"--top-k must be at least 1, got {top_k}")
    files = expand([str(p) for p in paths])
    images, good, bad = decode(files, *trained.stored_shape(), max_pixels=max_pixels)
    if not good:
        return [], bad
    loader = trained.loader(images, batch_size=batch_size)
    model = trained.model.eval()
    k = min(top_k, len(trained.classes))
    probs = torch.cat([tta_probabilities(model, x) if tta else model(x).float().softmax(1) for x, _ in loader]).cpu()
    values, indices = probs.topk(k, dim=1)
    preds = [Prediction(str(f), [(trained.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())])
             for f, vs, ix in zip(good, values, indices)]
    return preds, bad
