"""The stages a network is written in (blocks, pools, dropout) and the checks every model's options pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nin.bounds import MAX_IMAGE_SIDE, Range
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
NUM_CLASSES = Range(1, 100_000)


IN_CHANNELS = Range(1, 256)


WIDTH = Range(1 / 16, 8)  # a channel multiplier: below 1/16 every layer of nin28 is one channel wide


HEAD_WIDTH = Range(1, 65_536)


DROPOUT = Range(0, 1, hi_open=True)


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
