"""Preparing a trained model for inference.

In eval mode a BatchNorm layer is a fixed per-channel affine map
``y = (x - mean) / sqrt(var + eps) * gamma + beta``. Right after a convolution it
can be folded into that convolution's weights and bias, which removes one pass
over every activation map and gives the same outputs up to rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair fused into one ``Conv2d``.

    Pairs are found inside ``nn.Sequential`` containers (every NiN block is one).
    The BatchNorm is replaced by ``nn.Identity``, so stage and layer names are
    unchanged. ``model`` itself is not modified. A BatchNorm that does not
    directly follow a convolution is kept as it is.
    """
    channels_last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                        and not p.is_contiguous() for p in model.parameters())
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                    and bn.track_running_stats and bn.running_mean is not None):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    if channels_last:
        folded.to(memory_format=torch.channels_last)
    return folded
