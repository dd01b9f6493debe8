"""Test-set evaluation of a trained model: predictions, the confusion matrix, per-class accuracy."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nin.atomic import atomic_paths
from nin.data.loader import DeviceLoader
from nin.errors import NinError
from nin.inference.tta import with_tta


@torch.inference_mode()
def predict(model: nn.Module, loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and true labels of every example in ``loader``, in order."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(y)
    model.train(was_training)
    return torch.cat(preds).cpu(), torch.cat(labels).cpu()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[i, j]``: examples of true class ``i`` predicted as ``j``."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def checked_test_split(trained, data_dir: str | None = None):
    """The run's test split, checked to have the classes the model was trained on (an image folder may have
    changed since); ``data_dir``: where to find the data, if not where the run found it."""
    test = trained.test_split(data_dir)
    if list(test.classes) != list(trained.classes):
        raise NinError(f"{test.images_path}: the test images have classes {', '.join(test.classes)}; the model was "
                       f"trained on {', '.join(trained.classes)}")
    return test


@dataclass
class Evaluation:
    """A trained model's score on its test split: accuracy, per-class accuracy and the confusion matrix."""

    checkpoint: str
    model: str
    dataset: str
    classes: list[str]
    confusion: torch.Tensor  # int64 [classes, classes]: row = true class, column = predicted
    tta: bool = False  # predictions averaged over the image and its mirror image (nin.inference.tta)

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(self.examples, 1)

    @property
    def per_class(self) -> list[float]:
        """Accuracy on each class's test images (0 for a class without any)."""
        return (self.confusion.diag().double() / self.confusion.sum(1).clamp(min=1)).tolist()

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "model": self.model, "dataset": self.dataset,
                "examples": self.examples, "test_acc": self.accuracy, "tta": self.tta,
                "per_class_acc": dict(zip(self.classes, self.per_class)), "confusion": self.confusion.tolist()}


def evaluate_trained(trained, data_dir: str | None = None, batch_size: int = 1000, *, tta: bool = False) -> Evaluation:
    """Score ``trained`` (:func:`nin.inference.trained.load_trained`) on its run's test split; ``tta``: with
    horizontal-flip test-time augmentation (:class:`nin.inference.tta.FlipTTA`)."""
    test = checked_test_split(trained, data_dir)
    preds, truth = predict(with_tta(trained.model, tta), trained.loader(test.images, test.labels, batch_size))
    cm = confusion_matrix(preds, truth, len(trained.classes))
    return Evaluation(str(trained.path), trained.name, trained.dataset, list(trained.classes), cm, tta)


def evaluation_paths(out: str | os.PathLike, tta: bool = False) -> tuple[Path, Path]:
    """The figure and JSON that :func:`write_evaluation` writes in ``out``: ``confusion.png`` and
    ``evaluation.json``, or ``confusion-tta.png`` and ``evaluation-tta.json`` for an evaluation with ``tta``, so
    that the two never replace each other."""
    suffix = "-tta" if tta else ""
    return Path(out) / f"confusion{suffix}.png", Path(out) / f"evaluation{suffix}.json"


def write_evaluation(ev: Evaluation, out: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """:func:`evaluation_paths` (``OUT/confusion.png`` and ``OUT/evaluation.json``, or their ``-tta`` names), both or
    neither; existing ones are kept unless ``force``."""
    from nin.plots import plot_confusion

    png, doc = evaluation_paths(out, ev.tta)
    title = f"{ev.model}: test acc {ev.accuracy:.4f}" + (" (flip TTA)" if ev.tta else "")
    with atomic_paths(png, doc, exclusive=not force) as (tmp_png, tmp_json):
        plot_confusion(ev.confusion, ev.classes, tmp_png, title=title)
        tmp_json.write_text(json.dumps({**ev.to_dict(), "confusion_png": str(png)}, indent=1))
    return png, doc
