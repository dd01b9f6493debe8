"""Test-set evaluation of a trained model: predictions, the confusion matrix, per-class accuracy."""

from __future__ import annotations

import torch
from torch import nn

from nin.data.loader import DeviceLoader


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
