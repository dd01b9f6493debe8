"""Network in Network models.

Reference: Min Lin, Qiang Chen, Shuicheng Yan, "Network In Network", ICLR 2014,
arXiv:1312.4400.

A NiN is a stack of *mlpconv blocks* (one spatial convolution followed by 1x1
convolutions, each with a ReLU: a small MLP slid over every pixel), pooling and
dropout stages, and a global-average-pooling head in place of fully connected
layers: the last block has one channel per class and the head averages each
channel to one logit. (``head="fc"`` swaps in a fully connected layer over the
class maps, the paper's comparison.)

Architectures are data: a spec is a tuple of stages (:class:`Block`,
:class:`Pool`, :class:`Dropout`); :class:`NiN` builds a module from a spec,
and each registered model is a one-line factory over a spec table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn

from nin.errors import NinError
from nin.models.registry import register_model
from nin.models.specs import (
    CLASSES,
    HEAD_WIDTH,
    Block,
    Dropout,
    Pool,
    Stage,
    Width,
    check_input_size,
    check_overrides,
    conv_out_size,
)

__all__ = ["DEFAULT_MODEL", "OVERRIDES", "SPECS", "NiN", "nin28", "nin28_l", "nin28_m", "nin28_s", "nin_block",
           "nin_cifar10", "nin_d2l"]


# --------------------------------------------------------------------------- specs


# ------------------------------------------------------------------- the builder


def nin_block(
    in_channels: int,
    widths: tuple[int, ...],
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    batch_norm: bool = False,
    relu_last: bool = True,
) -> nn.Sequential:
    """Build one mlpconv block.

    ``widths[0]`` is the spatial conv's output; each further width is a 1x1 conv.
    With ``batch_norm`` each conv is followed by BatchNorm (and has no bias).
    ``nin_block(1, (96, 96, 96), 11, 4)`` is the d2l block.
    """
    layers: list[nn.Module] = []
    cin = in_channels
    for i, cout in enumerate(widths):
        last = i == len(widths) - 1
        linear = last and not relu_last
        k, s, p = (kernel, stride, padding) if i == 0 else (1, 1, 0)
        norm = batch_norm and not linear
        layers.append(nn.Conv2d(cin, cout, k, s, p, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        if not linear:
            layers.append(nn.ReLU(inplace=True))
        cin = cout
    return nn.Sequential(*layers)


def _resolve_widths(block: Block, num_classes: int, mlp_layers: int | None, width: float) -> tuple[int, ...]:
    """Apply the ``mlp_layers`` and ``width`` overrides to a block's widths.

    Fewer 1x1 convs keep the *last* ones (so a classifier block still ends in
    ``num_classes``); more repeat the first 1x1 width in front. With no 1x1 conv
    left, the spatial conv takes the block's final width.
    """
    ws = block.widths()
    mlp = list(ws[1:])
    if mlp_layers is not None:
        if not mlp and mlp_layers > 0:
            mlp = [ws[0]]
        if mlp_layers <= len(mlp):
            mlp = mlp[len(mlp) - mlp_layers :]
        else:
            mlp = [mlp[0]] * (mlp_layers - len(mlp)) + mlp
    first = ws[0] if mlp else ws[-1]

    def channels(w: Width) -> int:
        if w == CLASSES:
            return num_classes
        return max(1, int(round(w * width)))

    return tuple(channels(w) for w in (first, *mlp))


class NiN(nn.Module):
    """A Network-in-Network classifier built from a tuple of stages.

    ``features`` holds the named stages (``block1``, ``pool1``, ``drop1``, ...);
    its output has one channel per class: the class evidence maps. ``head`` is
    global average pooling and a flatten (``head="fc"``: a flatten and one linear layer).
    """

    def __init__(
        self,
        spec: tuple[Stage, ...],
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: tuple[int, int] = (224, 224),
        mlp_layers: int | None = None,
        width: float = 1.0,
        head_width: int | None = None,
        batch_norm: bool = False,
        dropout: float | None = None,
        head: Literal["gap", "fc"] = "gap",
    ) -> None:
        super().__init__()
        check_overrides(num_classes, in_channels, mlp_layers, width, dropout)
        if head not in ("gap", "fc"):
            raise NinError(f"head must be 'gap' or 'fc', got {head!r}")
        input_size = check_input_size(input_size)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        counts = {"block": 0, "pool": 0, "drop": 0}
        cin = in_channels
        h, w = input_size  # tracked for the fc head's input size
        if dropout and not any(isinstance(st, Dropout) for st in spec):  # a spec without dropout gets it after
            spec = tuple(x for st in spec for x in ((st, Dropout(dropout)) if isinstance(st, Pool) else (st,)))
        last_block = max(i for i, s in enumerate(spec) if isinstance(s, Block))
        for i, stage in enumerate(spec):
            if isinstance(stage, Block):
                widths = _resolve_widths(stage, num_classes, mlp_layers, width)
                if head_width is not None and i == last_block:
                    widths = _head_widths(widths, head_width)
                module: nn.Module = nin_block(
                    cin, widths, stage.kernel, stage.stride, stage.padding, batch_norm, stage.relu_last
                )
                cin, kind = widths[-1], "block"
                h, w = (conv_out_size(v, stage.kernel, stage.stride, stage.padding) for v in (h, w))
            elif isinstance(stage, Pool):
                cls = nn.MaxPool2d if stage.kind == "max" else nn.AvgPool2d
                module, kind = cls(stage.kernel, stage.stride, stage.padding, ceil_mode=stage.ceil_mode), "pool"
                h, w = (conv_out_size(v, stage.kernel, stage.stride, stage.padding, stage.ceil_mode) for v in (h, w))
            else:
                module, kind = nn.Dropout(stage.p if dropout is None else dropout), "drop"
            counts[kind] += 1
            stages[f"{kind}{counts[kind]}"] = module
        if cin != num_classes:
            raise ValueError(f"the last block has {cin} channels, expected one per class ({num_classes})")
        if h < 1 or w < 1:
            raise NinError(f"input {input_size[0]}x{input_size[1]} is too small for this network (its maps shrink "
                           "to nothing)")
        self.features = nn.Sequential(stages)
        if head == "gap":  # NiN's head: each class map averaged to one logit, no parameters
            self.head = nn.Sequential(OrderedDict(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        else:  # the paper's comparison: the class maps flattened into a fully connected layer
            self.head = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(cin * h * w, num_classes)))
        self.num_classes = num_classes
        self.input_size = (in_channels, *input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, classes, h, w): one evidence map per class
        if FUSED_CPU_BLOCKS and _fused_cpu_ok(self.features, x):
            for stage in self.features:
                x = _fused_block(stage, x) if isinstance(stage, nn.Sequential) else stage(x)
            return x
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (N, classes, h, w) -> (N, classes): the mean of each map (fc: a linear map of all)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)  # (N, classes, h, w)
        return self.forward_head(x)  # (N, classes) logits

    def named_stages(self) -> Iterator[tuple[str, nn.Module]]:
        """Every stage in order, the head's ``gap`` and ``flatten`` included."""
        yield from self.features.named_children()
        yield from self.head.named_children()


# ------------------------------------------------------- fused CPU kernels (bf16 autocast)

#: Whether :meth:`NiN.forward_features` runs each conv + ReLU pair as one oneDNN primitive (ReLU as a
#: post-op) on CPUs under bf16 autocast (eager only: not when tracing, scripting, compiling or exporting,
#: nor when any hook watches the modules). Same modules and parameters; the fused pairs' outputs and
#: gradients are bit-identical to the module-by-module run. It saves the ReLU's separate pass over each
#: activation (for nin_d2l on a 2-core CPU, 110 ms of a 1.1 s step). Set False to run module by module.
FUSED_CPU_BLOCKS = True
#: Under the fused path, a 1-channel strided first conv (nin_d2l's 11x11 stride 4) runs as the
#: equivalent stride-1 conv over a space-to-depth view (16 channels, 3x3 kernel): oneDNN's AMX kernels
#: are slow with one input channel, mostly for the weight gradient (5x faster this way). Same function; the
#: sums are taken in another order, so outputs may differ by one bf16 rounding step and the gradients
#: are as far from fp32's as the direct bf16 conv's are (checked against an fp32 run).
SPACE_TO_DEPTH_FIRST_CONV = True


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or getattr(m, "_forward_hooks_with_kwargs", None))


def _fused_cpu_ok(features: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused path may run: eager bf16 autocast on a CPU with oneDNN, nobody watching the modules."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.onnx.is_in_onnx_export() or not torch.backends.mkldnn.is_available():
        return False
    if not torch.backends.mkldnn.enabled or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # its bf16 kernels need AVX-512 (or AVX-NE-CONVERT):
        return False  # without them autocast's own path emulates bf16, and this one would raise
    from torch.nn.modules import module as _module

    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return False
    return not any(_has_hooks(m) for m in features.modules())


def _plain_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and m.dilation == (1, 1)
            and not isinstance(m.padding, str))


def _fused_block(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run an mlpconv block with each Conv2d directly followed by a ReLU as one fused primitive."""
    layers = list(block)
    i = 0
    while i < len(layers):
        m = layers[i]
        if _plain_conv(m) and i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU:
            x = _conv_relu(m, x)
            i += 2
        else:
            x = m(x)
            i += 1
    return x


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` in bf16, as autocast would run it (inputs cast to bf16), with the ReLU fused."""
    dt = torch.bfloat16
    w = conv.weight.to(dt)
    b = conv.bias.to(dt) if conv.bias is not None else None
    stride, padding = list(conv.stride), list(conv.padding)
    if SPACE_TO_DEPTH_FIRST_CONV and _space_to_depth_fits(conv, x):
        x, w = _space_to_depth(x, w, conv.stride[0], dt)
        stride, padding = [1, 1], [0, 0]
    else:
        x = x.to(dt)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _ConvReLU.apply(x, w, b, stride, padding)
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, [1, 1], 1, "relu", [], "")


def _space_to_depth_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    s = conv.stride[0]
    return (conv.in_channels == 1 and s > 1 and conv.stride == (s, s) and conv.padding == (0, 0)
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] >= s and x.dim() == 4)


def _space_to_depth(x: torch.Tensor, w: torch.Tensor, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-``s`` conv of a 1-channel ``x`` with ``w`` [O, 1, k, k] as a stride-1 conv with ``s*s`` channels.

    The kernel is zero-padded to ``k' = s * ceil(k / s)`` and cut into ``s x s`` phases: channel
    ``(i, j)`` of the new input holds pixels ``(s*h + i, s*w + j)``, channel ``(i, j)`` of the new
    ``(k'/s) x (k'/s)`` kernel the taps ``(s*u + i, s*v + j)``. Each output sums the same products.
    ``x`` is cast to ``dtype`` (``w`` already is).
    """
    n, _, h, wd = x.shape
    o, k = w.shape[0], w.shape[-1]
    kb = -(-k // s)  # the new kernel's side
    oh, ow = (h - k) // s + 1, (wd - k) // s + 1
    hh, ww = s * (oh - 1 + kb), s * (ow - 1 + kb)  # input rows/cols the new conv reads (zeros past the end)
    x = x[:, :, :hh, :ww]
    if x.shape[-2] < hh or x.shape[-1] < ww:
        x = torch.nn.functional.pad(x, (0, ww - x.shape[-1], 0, hh - x.shape[-2]))
    # (n, 1, H/s, s, W/s, s) -> (n, H/s, W/s, s, s): the s*s phases as the channels of an NHWC tensor
    # (one copy: the reordering and the cast to ``dtype`` in the same pass)
    phases = x.reshape(n, hh // s, s, ww // s, s).permute(0, 1, 3, 2, 4)
    xs = torch.empty(phases.shape, dtype=dtype, device=x.device).copy_(phases)
    xs = xs.view(n, hh // s, ww // s, s * s).permute(0, 3, 1, 2)  # (n, s*s, H/s, W/s), channels_last strides
    wp = torch.nn.functional.pad(w, (0, kb * s - k, 0, kb * s - k))
    ws = wp.reshape(o, kb, s, kb, s).permute(0, 2, 4, 1, 3).reshape(o, s * s, kb, kb)
    return xs, ws.contiguous(memory_format=torch.channels_last)


class _ConvReLU(torch.autograd.Function):
    """``relu(conv2d(x, w, b))`` forward as one oneDNN primitive; backward as autograd does it unfused:
    ``threshold_backward`` on the saved output, then ``convolution_backward`` (same kernels, same gradients)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, [1, 1], 1, "relu", [], "")
        ctx.save_for_backward(x, w, y)
        ctx.conf = (stride, padding, b is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, y = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        gz = torch.ops.aten.threshold_backward(gy, y, 0)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gz, x, w, [w.shape[0]] if has_bias else None, stride, padding, [1, 1], False, [0, 0], 1,
            [need[0], need[1], has_bias and need[2]])
        return gx, gw, gb if has_bias else None, None, None


def _head_widths(widths: tuple[int, ...], head_width: int) -> tuple[int, ...]:
    """The classifier block with every conv but the last ``head_width`` wide (a gradual reduction to the classes)."""
    if not isinstance(head_width, int) or isinstance(head_width, bool):
        raise NinError(f"head_width must be an integer, got {head_width!r}")
    HEAD_WIDTH.check(head_width, "head_width")
    if len(widths) < 2:
        raise NinError("head_width needs a 1x1 conv in the classifier block (mlp_layers of at least 1)")
    return (head_width,) * (len(widths) - 1) + widths[-1:]


# ------------------------------------------------------------------------ weights


# ----------------------------------------------------------------------- registry

#: The overrides every registered NiN accepts.
OVERRIDES = ("num_classes", "in_channels", "input_size", "mlp_layers", "width", "head_width", "batch_norm",
             "dropout", "head")


def _build(spec: tuple[Stage, ...], default_input: tuple[int, int, int], batch_norm: bool = False, **kw) -> NiN:
    kw.setdefault("in_channels", default_input[0])
    kw.setdefault("input_size", default_input[1:])
    return NiN(spec, batch_norm=batch_norm, **kw)


# ---------------------------------------------------------------- the spec table

#: d2l's NiN for Fashion-MNIST resized to 224x224 (an AlexNet-shaped NiN).
NIN_D2L: tuple[Stage, ...] = (
    Block(96, 11, stride=4),
    Pool("max", 3, 2),
    Block(256, 5, padding=2),
    Pool("max", 3, 2),
    Block(384, 3, padding=1),
    Pool("max", 3, 2),
    Dropout(0.5),
    Block(CLASSES, 3, padding=1),
)

#: The authors' CIFAR-10 network (Caffe's pooling rounds up: 32 -> 16 -> 8).
NIN_CIFAR10: tuple[Stage, ...] = (
    Block(192, 5, padding=2, mlp=(160, 96)),
    Pool("max", 3, 2, ceil_mode=True),
    Dropout(0.5),
    Block(192, 5, padding=2, mlp=(192, 192)),
    Pool("max", 3, 2, ceil_mode=True),
    Dropout(0.5),
    Block(192, 3, padding=1, mlp=(192, CLASSES)),
)

#: Our NiN for 28x28 images at native resolution, built to train fast on a CPU:
#: three mlpconv blocks at 28, 14 and 7 pixels, BatchNorm, a linear classifier conv.
#: Narrow at full resolution, where each channel costs the most; one 1x1 conv in
#: the first two blocks, two in the classifier block.
NIN28: tuple[Stage, ...] = (
    Block(16, 3, padding=1, mlp=(16,)),
    Pool("max", 3, 2, padding=1),
    Block(64, 3, padding=1, mlp=(64,)),
    Pool("max", 3, 2, padding=1),
    Block(96, 3, padding=1, mlp=(96, CLASSES), relu_last=False),
)

#: Wider NiNs for 28x28, for accuracy per parameter rather than speed: the same three resolutions, BatchNorm,
#: and widths doubling with each halving of the maps (small, medium, large). ``l`` adds a second block at
#: 14 pixels. Each is a NiN (mlpconv blocks, a global-average-pooling head, no fully connected layer).
NIN28_S: tuple[Stage, ...] = (
    Block(32, 3, padding=1, mlp=(32,)),
    Pool("max", 3, 2, padding=1),
    Block(64, 3, padding=1, mlp=(64,)),
    Pool("max", 3, 2, padding=1),
    Block(128, 3, padding=1, mlp=(128, CLASSES), relu_last=False),
)
NIN28_M: tuple[Stage, ...] = (
    Block(64, 3, padding=1, mlp=(64,)),
    Pool("max", 3, 2, padding=1),
    Block(128, 3, padding=1, mlp=(128,)),
    Pool("max", 3, 2, padding=1),
    Block(256, 3, padding=1, mlp=(256, CLASSES), relu_last=False),
)
NIN28_L: tuple[Stage, ...] = (
    Block(96, 3, padding=1, mlp=(96,)),
    Pool("max", 3, 2, padding=1),
    Block(192, 3, padding=1, mlp=(192,)),
    Block(192, 3, padding=1, mlp=(192,)),
    Pool("max", 3, 2, padding=1),
    Block(384, 3, padding=1, mlp=(384, CLASSES), relu_last=False),
)

SPECS: Mapping[str, tuple[Stage, ...]] = MappingProxyType(
    {"nin_d2l": NIN_D2L, "nin_cifar10": NIN_CIFAR10, "nin28": NIN28, "nin28_s": NIN28_S, "nin28_m": NIN28_M,
     "nin28_l": NIN28_L}
)


@register_model((1, 224, 224), "d2l's NiN for Fashion-MNIST at 224x224: 96/256/384/10 channels, 1,992,166 parameters",
                options=OVERRIDES)
def nin_d2l(**kw) -> NiN:
    return _build(NIN_D2L, (1, 224, 224), **kw)


@register_model((3, 32, 32), "the paper's CIFAR-10 NiN: 192-160-96 / 192-192-192 / 192-192-10, 966,986 parameters",
                options=OVERRIDES)
def nin_cifar10(**kw) -> NiN:
    return _build(NIN_CIFAR10, (3, 32, 32), **kw)


@register_model((1, 28, 28), "NiN for 28x28 at native resolution with BatchNorm: 16-16 / 64-64 / 96-96-10, fast on CPU",
                options=OVERRIDES)
def nin28(**kw) -> NiN:
    return _build(NIN28, (1, 28, 28), **{"batch_norm": True, **kw})


@register_model((1, 28, 28), "wider NiN for 28x28 with BatchNorm: 32-32 / 64-64 / 128-128-10", options=OVERRIDES)
def nin28_s(**kw) -> NiN:
    return _build(NIN28_S, (1, 28, 28), **{"batch_norm": True, **kw})


@register_model((1, 28, 28), "wider NiN for 28x28 with BatchNorm: 64-64 / 128-128 / 256-256-10", options=OVERRIDES)
def nin28_m(**kw) -> NiN:
    return _build(NIN28_M, (1, 28, 28), **{"batch_norm": True, **kw})


@register_model((1, 28, 28), "wider NiN for 28x28 with BatchNorm: 96-96 / 192-192 x2 / 384-384-10",
                options=OVERRIDES)
def nin28_l(**kw) -> NiN:
    return _build(NIN28_L, (1, 28, 28), **{"batch_norm": True, **kw})


DEFAULT_MODEL = "nin28"

