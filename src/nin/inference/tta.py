"""Test-time augmentation by horizontal flips: ``nin evaluate --tta`` and ``nin predict --tta``.

Each batch is classified twice, as it is and mirrored left to right (``x.flip(-1)``), and the two softmax
distributions are averaged: ``p = (softmax(model(x)) + softmax(model(x.flip(-1)))) / 2``. The batch is the one
the model takes (already resized and normalized or whitened, ``[N, C, H, W]`` in any memory format), so this works
for every registered model, NiN or classic, and under autocast: the logits are taken to float32 before the
softmax, so the probabilities are float32 whatever precision the forward passes ran in.

:func:`tta_probabilities` returns those averaged probabilities. :class:`FlipTTA` wraps a model so that it can stand
in for it wherever logits are expected: its output is ``log p``, whose softmax is ``p`` again and whose argmax is
``p``'s. So accuracy, the confusion matrix and top-k probabilities are those of the averaged distribution, and a
loss computed on its output (``nn.CrossEntropyLoss``, as :func:`nin.training.trainer.evaluate` does) is the cross
entropy of the averaged probabilities, ``-log p[y]``: the loss of the prediction actually made, not the mean of the
two views' losses (which would score each view alone, and be at least as large, by the concavity of log).
``nin evaluate`` itself reports accuracy and no loss.

A run trained without random flips (``data.flip`` false) never saw a mirrored image; TTA still runs on it, and
:func:`tta_note` says so.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def tta_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, classes]``: the mean of ``softmax(model(x))`` and ``softmax(model(x.flip(-1)))``.

    ``x`` is a batch as the model takes it (normalized, NCHW, any memory format); the model's mode and autograd
    are left as the caller set them."""
    p = model(x).float().softmax(1)
    q = model(x.flip(-1)).float().softmax(1)
    return (p + q) / 2


class FlipTTA(nn.Module):
    """``model`` with horizontal-flip test-time augmentation: ``forward(x)`` is the log of
    :func:`tta_probabilities` (float32), so it can be used as logits: softmax gives the averaged probabilities,
    argmax the averaged prediction, and cross entropy the loss of the averaged probabilities.

    The log is taken as ``logsumexp`` of the two views' log-softmax minus ``log 2``: finite even where a
    probability underflows to 0 in float32 (label smoothing takes every class's log-probability). It starts in the
    mode ``model`` is in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # the wrapped model's mode, which whoever sets this one's restores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.model(x).float().log_softmax(1)
        b = self.model(x.flip(-1)).float().log_softmax(1)
        return torch.logaddexp(a, b) - math.log(2)


def with_tta(model: nn.Module, tta: bool) -> nn.Module:
    """``FlipTTA(model)`` if ``tta``, else ``model`` itself."""
    return FlipTTA(model) if tta else model


def tta_note(trained) -> str | None:
    """A one-line note when ``trained`` (:class:`nin.inference.trained.Trained`) was trained without random
    horizontal flips, so its model never saw a mirrored image; None when it was (or its settings do not say)."""
    if getattr(trained.config.data, "flip", True):
        return None
    return (f"{trained.path}: this run was trained without horizontal flips (data.flip false), so the model never "
            "saw mirrored images; --tta averages in its predictions on them anyway")
