"""The classic CNNs NiN is measured against: LeNet, AlexNet and VGG-11, as in *Dive into Deep Learning*.

References: Y. LeCun et al., "Gradient-based learning applied to document
recognition", 1998; A. Krizhevsky, I. Sutskever, G. Hinton, "ImageNet
classification with deep convolutional neural networks", NeurIPS 2012;
K. Simonyan, A. Zisserman, "Very deep convolutional networks for large-scale
image recognition", arXiv:1409.1556.

These are the d2l versions for one-channel Fashion-MNIST (LeNet at 28x28 with
sigmoids and average pooling; AlexNet and VGG-11 at 224x224 with 10 classes).
They end in fully connected layers, the design NiN replaced with global average
pooling, so their first fully connected layer's size depends on the input size:
it is worked out from the spec when the model is built (no lazy layers).
Registered in the ``classic`` family; they train like any other model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from nin.errors import NinError
from nin.models.registry import register_model
from nin.models.specs import CLASSES, Dropout, Pool, Width, check_input_size, check_overrides, conv_out_size


@dataclass(frozen=True)
class Conv:
    """A ``kernel`` x ``kernel`` convolution to ``out`` channels, followed by the activation."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class Dense:
    """A fully connected layer to ``out`` features; all but the last are followed by the activation."""

    out: Width


Stage = Conv | Pool | Dropout | Dense


class ConvNet(nn.Module):
    """A convolutional network with a fully connected classifier, built from a tuple of stages.

    ``features`` holds the conv and pooling stages (``conv1``, ``pool1``, ...);
    ``classifier`` flattens and holds the dense stages (``fc1``, ``drop1``, ...).
    """

    def __init__(
        self,
        spec: tuple[Stage, ...],
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: tuple[int, int] = (224, 224),
        activation: Literal["relu", "sigmoid"] = "relu",
        width: float = 1.0,
        batch_norm: bool = False,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        check_overrides(num_classes, in_channels, None, width, dropout)
        h, w = check_input_size(input_size)

        def act() -> nn.Module:
            return nn.ReLU(inplace=True) if activation == "relu" else nn.Sigmoid()

        def scaled(n: int) -> int:
            return max(1, int(round(n * width)))

        features: OrderedDict[str, nn.Module] = OrderedDict()
        classifier: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        counts = {"conv": 0, "pool": 0, "fc": 0, "drop": 0}
        c = in_channels
        last_dense = max(i for i, s in enumerate(spec) if isinstance(s, Dense))
        for i, stage in enumerate(spec):
            if isinstance(stage, Conv):
                cout = scaled(stage.out)
                layers = [nn.Conv2d(c, cout, stage.kernel, stage.stride, stage.padding, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(cout)] if batch_norm else []
                name, module = "conv", nn.Sequential(*layers, act())
                c = cout
                h, w = (conv_out_size(s, stage.kernel, stage.stride, stage.padding) for s in (h, w))
            elif isinstance(stage, Pool):
                cls = nn.MaxPool2d if stage.kind == "max" else nn.AvgPool2d
                name, module = "pool", cls(stage.kernel, stage.stride, stage.padding, ceil_mode=stage.ceil_mode)
                h, w = (conv_out_size(s, stage.kernel, stage.stride, stage.padding, stage.ceil_mode) for s in (h, w))
            elif isinstance(stage, Dropout):
                name, module = "drop", nn.Dropout(stage.p if dropout is None else dropout)
            else:
                fin = c * h * w
                fout = num_classes if stage.out == CLASSES else scaled(stage.out)
                linear = nn.Linear(fin, fout)
                name, module = "fc", (linear if i == last_dense else nn.Sequential(linear, act()))
                c, h, w = fout, 1, 1
            counts[name] += 1
            if h < 1 or w < 1:
                raise NinError(f"input {in_channels}x{input_size[0]}x{input_size[1]} is too small for this network: "
                               f"{name}{counts[name]} would output {h}x{w}")
            (classifier if name in ("fc", "drop") and counts["fc"] else features)[f"{name}{counts[name]}"] = module
        self.features = nn.Sequential(features)
        self.classifier = nn.Sequential(classifier)
        self.num_classes = num_classes
        self.input_size = (in_channels, *check_input_size(input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C, H, W) -> (N, c, h, w)
        return self.classifier(x)  # (N, c*h*w) -> (N, classes) logits

    def named_stages(self) -> Iterator[tuple[str, nn.Module]]:
        """Every stage in order, the classifier's ``flatten`` included."""
        yield from self.features.named_children()
        yield from self.classifier.named_children()


# ---------------------------------------------------------------- the spec table

#: d2l's LeNet-5: sigmoid activations, 2x2 average pooling, 16x5x5 -> 120 -> 84 -> classes.
LENET: tuple[Stage, ...] = (
    Conv(6, 5, padding=2), Pool("avg", 2, 2),
    Conv(16, 5), Pool("avg", 2, 2),
    Dense(120), Dense(84), Dense(CLASSES),
)

#: d2l's AlexNet for one-channel 224x224 inputs: 256x5x5 -> 4096 -> 4096 -> classes.
ALEXNET: tuple[Stage, ...] = (
    Conv(96, 11, stride=4, padding=1), Pool("max", 3, 2),
    Conv(256, 5, padding=2), Pool("max", 3, 2),
    Conv(384, 3, padding=1), Conv(384, 3, padding=1), Conv(256, 3, padding=1), Pool("max", 3, 2),
    Dense(4096), Dropout(0.5), Dense(4096), Dropout(0.5), Dense(CLASSES),
)

#: VGG-11 (configuration A): 3x3 convs 64 / 128 / 256-256 / 512-512 / 512-512, 512x7x7 -> 4096 -> 4096 -> classes.
VGG11: tuple[Stage, ...] = (
    Conv(64, 3, padding=1), Pool("max", 2, 2),
    Conv(128, 3, padding=1), Pool("max", 2, 2),
    Conv(256, 3, padding=1), Conv(256, 3, padding=1), Pool("max", 2, 2),
    Conv(512, 3, padding=1), Conv(512, 3, padding=1), Pool("max", 2, 2),
    Conv(512, 3, padding=1), Conv(512, 3, padding=1), Pool("max", 2, 2),
    Dense(4096), Dropout(0.5), Dense(4096), Dropout(0.5), Dense(CLASSES),
)

OPTIONS = ("num_classes", "in_channels", "input_size", "width", "batch_norm", "dropout")


def _build(spec: tuple[Stage, ...], default_input: tuple[int, int, int], **kw) -> ConvNet:
    kw.setdefault("in_channels", default_input[0])
    kw.setdefault("input_size", default_input[1:])
    return ConvNet(spec, **kw)


@register_model((1, 28, 28), "baseline: d2l's LeNet-5 (sigmoid, average pooling, 3 fully connected layers)",
                family="classic", options=tuple(o for o in OPTIONS if o != "dropout"))
def lenet(**kw) -> ConvNet:
    return _build(LENET, (1, 28, 28), activation="sigmoid", **kw)


@register_model((1, 224, 224), "baseline: d2l's AlexNet for 1x224x224 (5 convs, 3 fully connected layers)",
                family="classic", options=OPTIONS)
def alexnet(**kw) -> ConvNet:
    return _build(ALEXNET, (1, 224, 224), **kw)


@register_model((1, 224, 224), "baseline: VGG-11 as in d2l, full width (8 convs, 3 fully connected layers)",
                family="classic", options=OPTIONS)
def vgg11(**kw) -> ConvNet:
    return _build(VGG11, (1, 224, 224), **kw)
