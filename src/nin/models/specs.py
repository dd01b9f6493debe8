"""The stages a network is written in (blocks, pools, dropout) and the checks every model's options pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nin.bounds import MAX_IMAGE_SIDE, bounded, range_of, setting
from nin.errors import NinError

#: A width is a channel count, or ``CLASSES`` for "as many channels as classes".
CLASSES = "classes"


Width = int | Literal["classes"]


@dataclass(frozen=True)
class Block:
    """An mlpconv block: a ``kernel`` x ``kernel`` conv to ``out``, then 1x1 convs of widths ``mlp``.

    ``mlp=None`` means two 1x1 convs as wide as ``out`` (the d2l block).
    ``relu_last=False`` leaves the block's final conv linear (no norm, no ReLU),
    which a classifier block feeding global average pooling may want.
    """

    out: Width
    kernel: int
    stride: int = 1
    padding: int = 0
    mlp: tuple[Width, ...] | None = None
    relu_last: bool = True

    def widths(self) -> tuple[Width, ...]:
        """The output width of every conv in the block, spatial conv first."""
        return (self.out, *(self.mlp if self.mlp is not None else (self.out, self.out)))


@dataclass(frozen=True)
class Pool:
    """A max- or average-pooling stage."""

    kind: Literal["max", "avg"]
    kernel: int
    stride: int
    padding: int = 0
    ceil_mode: bool = False


@dataclass(frozen=True)
class Dropout:
    """A dropout stage with drop probability ``p``."""

    p: float = 0.5


Stage = Block | Pool | Dropout


def conv_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling window over ``size`` (PyTorch's rule, ceil_mode included)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # a last window starting in the padding is dropped
        out -= 1
    return out


def check_input_size(size) -> tuple[int, int]:
    """``size`` as an ``(H, W)`` tuple of integers in [1, MAX_IMAGE_SIDE], or :class:`NinError`."""
    try:
        h, w = (int(v) for v in size)
        ok = (h, w) == tuple(size) and all(not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in (h, w))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        shown = repr(size) if len(repr(size)) <= 40 else repr(size)[:37] + "..."
        raise NinError(f"input_size must be two integers (H, W) from 1 to {MAX_IMAGE_SIDE}, got {shown}")
    return h, w


#: Ranges of the options every model takes (the flags of the same names are checked against them too).
@dataclass(frozen=True)
class ModelOptions:
    """The options a registered model takes (``create_model(name, **options)``; None: the model's own), each
    with its range and help text: the model-option flags are made from these fields (nin.cli.options)."""

    num_classes: int | None = bounded(None, 1, 100_000, help="output classes")
    in_channels: int | None = bounded(None, 1, 256, help="input channels")
    mlp_layers: int | None = bounded(None, 0, 3, help="1x1 convs per block (the seed's ablation; 2 is NiN's)")
    # below 1/16 every layer of nin28 is one channel wide
    width: float | None = bounded(None, 1 / 16, 8, help="channel width multiplier")
    head_width: int | None = bounded(None, 1, 65_536, help="NiN: width of the classifier block's convs before the "
                                                          "last (a gradual reduction)")
    batch_norm: bool | None = setting(None, "BatchNorm after each conv")
    dropout: float | None = bounded(None, 0, 1, hi_open=True,
                                    help="drop probability of every dropout stage (NiN: a model without any, like "
                                         "nin28, gets one after each pooling stage)")
    head: Literal["gap", "fc"] | None = setting(
        None, "NiN: global average pooling (default) or a fully connected layer over the class maps")


NUM_CLASSES = range_of(ModelOptions, "num_classes")
IN_CHANNELS = range_of(ModelOptions, "in_channels")
WIDTH = range_of(ModelOptions, "width")
HEAD_WIDTH = range_of(ModelOptions, "head_width")
DROPOUT = range_of(ModelOptions, "dropout")


def check_overrides(num_classes, in_channels, mlp_layers, width, dropout) -> None:
    """The options every model family takes, each against its range (a one-line NinError naming it)."""
    for name, value, r in (("num_classes", num_classes, NUM_CLASSES), ("in_channels", in_channels, IN_CHANNELS)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise NinError(f"{name} must be an integer, got {value!r}")
        r.check(value, name)
    if mlp_layers is not None and (not isinstance(mlp_layers, int) or not 0 <= mlp_layers <= 3):
        raise NinError(f"mlp_layers must be 0, 1, 2 or 3, got {mlp_layers!r}")
    WIDTH.check(width, "width")
    if dropout is not None:
        DROPOUT.check(dropout, "dropout")
