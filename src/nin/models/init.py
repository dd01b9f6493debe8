"""Weight initialization, applied once when a model is first built (nothing else re-initializes a model)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from nin.errors import NinError


def init_weights(model: nn.Module, scheme: Literal["xavier", "kaiming", "default"]) -> nn.Module:
    """Re-initialize every conv and linear layer of ``model`` in place and return it.

    ``xavier`` is d2l's: Xavier-uniform weights, PyTorch's default biases.
    ``kaiming`` is He-normal for ReLU, fan-out for convolutions and fan-in for
    fully connected layers, with zero biases. ``default``
    keeps PyTorch's initialization. BatchNorm is reset to identity. Nothing
    else in this package ever re-initializes a model.
    """
    if scheme not in ("xavier", "kaiming", "default"):
        raise NinError(f"unknown init scheme {scheme!r}; choose xavier, kaiming or default")
    if scheme == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:  # fan-in: fan-out He init of a 490 -> 10 classifier has std 0.45, its logits start in the tens
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None and scheme == "kaiming":
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
