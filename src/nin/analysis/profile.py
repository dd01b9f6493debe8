"""What a model costs, layer by layer: parameters, multiply-accumulates and memory.

Everything here is counted from shapes: the model is copied to the ``meta``
device and one image is pushed through it with a hook on every leaf module, so
nothing is computed and the model itself is not touched.

**Compute.** One multiply-accumulate (MAC) is 2 FLOPs. Per image, forward:

* a convolution with ``C_in`` input channels (``g`` groups), a ``kh x kw`` kernel and
  an output of ``C_out x H_out x W_out`` costs ``C_out * H_out * W_out * (C_in / g) * kh * kw`` MACs;
* a fully connected layer from ``F_in`` to ``F_out`` features costs ``F_in * F_out`` MACs;
* element-wise work (ReLU, pooling, normalization, biases, the loss, the optimizer)
  is not counted; it is a few percent of these networks' totals.

A training step adds the backward pass: the gradient with respect to each layer's
weights costs its forward MACs again, and so does the gradient with respect to its
input, except where the input needs no gradient (the first layer's), so a step is
close to 3x the forward FLOPs. For ``nin_d2l`` at 224x224: 762.3 M MACs (1.52 GFLOP)
forward and 4.51 GFLOP for a training step, per image.

**Memory** (bytes at batch ``N``; activations in the compute dtype):

* inference: the weights, the input batch, and the largest set of activations alive
  at once while the layers run in order (a layer's input and output, a block's input
  until the block returns, and a max pooling's int64 indices, which PyTorch makes
  even with no autograd; nothing is kept);
* training: the weights, their gradients, the optimizer state (one buffer per
  parameter for SGD with momentum), the input batch, the activations the backward
  pass keeps, and the gradients in flight while it runs. What is kept follows
  PyTorch's autograd: convolutions, linear layers, BatchNorm and pooling keep their
  input; ReLU and sigmoid keep their output (an in-place ReLU shares its input's
  memory); max pooling also keeps its int64 indices and dropout its mask (one byte an
  element on CUDA, the activation dtype on a CPU); a flatten is a view. Each block of
  memory is counted once, however many layers keep it.
  (BatchNorm's per-channel batch statistics, 8 bytes a channel, are left out.)
  The peak is found by replaying the step: the forward pass allocates, then the
  backward pass walks the layers in reverse, allocating each layer's input gradient
  and weight gradients and freeing what the layer kept once nothing later needs it.

``nin profile`` prints all of it with the peaks measured by a real training step and a
real inference beside the estimates (see :mod:`nin.analysis.measure`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nin.errors import NinError
from nin.models.fold import fold_batchnorm, has_batchnorm

ACT_BYTES = {"none": 4, "bf16": 2, "fp16": 2}
STATE_PER_PARAM = {"sgd": 0, "momentum": 1, "adam": 2}  # optimizer buffers per parameter


def count_flops(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    *,
    batch: int = 1,
    train: bool = False,
) -> int:
    """FLOPs of one forward pass (``train=False``) or one forward and backward pass, by PyTorch's own counter.

    This is :class:`torch.utils.flop_counter.FlopCounterMode` run on a ``meta`` copy of
    the model: the independent check on :func:`profile_model`'s own count.
    ``input_size`` is ``(C, H, W)``; by default the model's own ``input_size``.
    """
    return sum(flop_counts_by_module(model, input_size, batch=batch, train=train).values())


def flop_counts_by_module(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    *,
    batch: int = 1,
    train: bool = False,
) -> dict[str, int]:
    """FLOPs per leaf module (``features.block1.0``), by :class:`~torch.utils.flop_counter.FlopCounterMode`."""
    input_size = tuple(input_size or model.input_size)  # type: ignore[arg-type]
    shadow = copy.deepcopy(model).to("meta").train(train)
    leaves = {id(m): n for n, m in shadow.named_modules() if not list(m.children())}
    x = torch.empty(batch, *input_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        if train:
            shadow(x).float().sum().backward()
        else:
            with torch.no_grad():
                shadow(x)
    # The counter names modules by their path from the root's class name: "NiN.features.block1.0".
    root = type(shadow).__name__
    names = {f"{root}.{n}": n for n in leaves.values()}
    out: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key in names:
            out[names[key]] = int(sum(ops.values()))
    return out


# ------------------------------------------------------------------ the trace


@dataclass
class _Step:
    """One leaf module's call, as seen by the trace (per image)."""

    name: str
    module: nn.Module
    inp: int  # storage id of the input (0: the model's input)
    out: int  # storage id of the output (the input's id when in place or a view)
    in_numel: int
    out_numel: int
    shape: tuple[int, ...]
    needs_grad_in: bool  # whether the input requires a gradient
    saves_input: bool = False
    saves_output: bool = False
    extra: int = 0  # bytes per image kept besides activations (pooling indices, dropout masks)


def _saves(m: nn.Module, train: bool, out_shape: tuple[int, ...], mask: int) -> tuple[bool, bool, int]:
    """(keeps its input, keeps its output, extra bytes per output element) for the backward pass.

    ``mask`` is the bytes per element of a dropout mask: CUDA's fused dropout keeps a
    bool mask, the CPU's keeps the scaled noise it multiplied by, in the activation dtype.
    """
    if not train:
        return False, False, 0
    if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh)):
        return False, True, 0
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return True, False, 8  # int64 indices of the maxima
    if isinstance(m, nn.Dropout):
        return False, False, (mask if m.p > 0 else 0)
    if isinstance(m, nn.AdaptiveAvgPool2d) and all(s == 1 for s in out_shape[-2:]):
        return False, False, 0  # computed as a mean, whose backward needs only the shape
    if isinstance(m, (nn.Flatten, nn.Identity, nn.Unflatten)):
        return False, False, 0
    return True, False, 0  # convolutions, linear layers, norms, pooling: their input


def _trace(model: nn.Module, input_size: tuple[int, ...], train: bool, mask: int = 1) -> list[_Step]:
    """Every leaf module's call on one image, in execution order, with storage identities."""
    shadow = copy.deepcopy(model).to("meta").train(train)
    steps: list[_Step] = []
    ids: dict[int, int] = {}  # id(tensor) -> storage id
    keep: list[torch.Tensor] = []  # hold every tensor so ids are not reused
    grad: dict[int, bool] = {0: False}  # storage id -> requires a gradient

    def hook(name: str):
        def run(m: nn.Module, args, out):
            x = args[0]
            sid_in = ids.get(id(x))
            if sid_in is None:  # produced outside any leaf module (a functional op): a new block
                sid_in = len(grad)
                grad[sid_in] = True
                ids[id(x)] = sid_in
            if out is x or (out._base is not None and (out._base is x or out._base is x._base)):
                sid_out = sid_in
            else:
                sid_out = len(grad)
            params = any(True for _ in m.parameters(recurse=False))
            grad[sid_out] = grad[sid_in] or params
            ids[id(out)] = sid_out
            keep.extend((x, out))
            shape = tuple(out.shape[1:])
            s_in, s_out, extra = _saves(m, train, shape, mask)
            steps.append(_Step(name, m, sid_in, sid_out, x.numel(), out.numel(), shape, grad[sid_in],
                               s_in, s_out, extra * out.numel()))
        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in shadow.named_modules() if not list(m.children())]
    x = torch.empty(1, *input_size, device="meta")
    ids[id(x)] = 0
    try:
        with torch.set_grad_enabled(train):
            shadow(x)
    except RuntimeError as e:
        raise NinError(f"input {'x'.join(map(str, input_size))} does not fit this model: "
                       f"{str(e).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
    return steps


def _macs(step: _Step) -> int:
    m = step.module
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return step.out_numel * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return step.out_numel * m.in_features
    return 0


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k, s = m.kernel_size, m.stride
        text = f"Conv2d {k[0]}x{k[1]}" + (f"/{s[0]}" if s[0] > 1 else "")
        return text
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        return f"{type(m).__name__} {k}x{k}/{s}"
    if isinstance(m, nn.Dropout):
        return f"Dropout {m.p:g}"
    return type(m).__name__


# -------------------------------------------------------------------- results


@dataclass
class LayerProfile:
    """One leaf module: output shape, parameters, MACs per image, bytes kept for backward per image."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    macs: int
    kept: int  # bytes per image of activations (and indices/masks) this layer adds to what backward keeps

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass
class Memory:
    """A memory estimate at one batch size: its parts and the peak, in bytes."""

    parts: dict[str, int]
    peak: int


@dataclass
class ModelProfile:
    """Everything :func:`profile_model` counts for one model, input size, batch and precision."""

    model: str
    input_size: tuple[int, int, int]
    batch: int
    amp: str
    optimizer: str
    layers: list[LayerProfile]
    params: int
    param_bytes: int
    macs: int  # forward, per image
    train_flops: int  # forward and backward, per image
    first_fc_params: int  # parameters of the first fully connected layer (0: it has none)
    inference: Memory
    training: Memory
    measured: dict[str, Any] = field(default_factory=dict)  # filled by nin.analysis.measure

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        """The inverse of :meth:`to_dict` (``nin profile --format json``'s output, one model)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["input_size"] = tuple(d["input_size"])
        kw["layers"] = [LayerProfile(**{**lp, "shape": tuple(lp["shape"])}) for lp in d["layers"]]
        kw["inference"], kw["training"] = Memory(**d["inference"]), Memory(**d["training"])
        return cls(**kw)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def profile_model(
    model: nn.Module,
    *,
    name: str = "",
    input_size: tuple[int, int, int] | None = None,
    batch: int = 1,
    amp: Literal["none", "bf16", "fp16"] = "none",
    optimizer: Literal["sgd", "momentum", "adam"] = "momentum",
    device: str = "cpu",
) -> ModelProfile:
    """Count ``model``'s parameters, MACs and memory at ``batch`` images of ``input_size`` (C, H, W).

    ``amp="bf16"`` (or ``"fp16"``) counts activations in 16 bits with float32 weights, as autocast
    runs them (plus the bfloat16 copies of the weights the backward pass keeps).
    ``optimizer`` sets the optimizer state: none (plain SGD), one buffer per parameter
    (SGD with momentum, the trainer's) or two (Adam). ``device`` ("cpu" or "cuda")
    picks the one rule that differs between them: the size of a dropout mask.
    """
    if amp not in ACT_BYTES:
        raise NinError(f"unknown amp mode {amp!r}; choose none, bf16 or fp16")
    if optimizer not in STATE_PER_PARAM:
        raise NinError(f"unknown optimizer {optimizer!r}; choose sgd, momentum or adam")
    if batch < 1:
        raise NinError(f"batch must be at least 1, got {batch}")
    input_size = tuple(input_size or model.input_size)  # type: ignore[assignment]
    act = ACT_BYTES[amp]
    steps = _trace(model, input_size, train=True, mask=1 if str(device).startswith("cuda") else act)

    kept_ids = {s.inp for s in steps if s.saves_input} | {s.out for s in steps if s.saves_output}
    layers, first_fc, train_macs = [], 0, 0
    for s in steps:
        new = s.out != s.inp
        kept = (s.out_numel * act if new and s.out in kept_ids else 0) + s.extra
        if amp != "none" and s.inp == 0:
            kept += s.in_numel * act  # the input's bfloat16 copy
        n = sum(p.numel() for p in s.module.parameters(recurse=False))
        macs = _macs(s)
        train_macs += macs * (1 + (n > 0) + s.needs_grad_in)
        if isinstance(s.module, nn.Linear) and not first_fc:
            first_fc = n
        layers.append(LayerProfile(s.name, _kind(s.module), s.shape, n, macs, kept))

    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(_bytes(p) for p in model.parameters())
    buffer_bytes = sum(_bytes(b) for b in model.buffers())
    inputs = batch * (4 * _numel(input_size) + 8)  # float32 images and int64 labels
    training = _simulate_training(steps, model, batch, amp, optimizer, param_bytes + buffer_bytes, inputs)
    inference = _simulate_inference(model, input_size, batch, amp, inputs)
    macs = sum(lp.macs for lp in layers)
    return ModelProfile(name or type(model).__name__, input_size, batch, amp, optimizer, layers, params,
                        param_bytes, macs, 2 * train_macs, first_fc, inference, training)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _last_uses(steps: list[_Step]) -> dict[int, int]:
    """For each storage, the index of the last step that needs it alive.

    That is the last step reading or writing it, or, for the input of a container
    (an ``nn.Sequential`` block), the container's last step: its ``forward`` holds
    a reference to its input until it returns.
    """
    last: dict[int, int] = {}
    first_leaf: dict[str, int] = {}
    last_leaf: dict[str, int] = {}
    for i, s in enumerate(steps):
        last[s.inp] = i
        last[s.out] = i
        parts = s.name.split(".")
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            first_leaf.setdefault(prefix, i)
            last_leaf[prefix] = i
    for prefix, i in first_leaf.items():
        sid = steps[i].inp
        last[sid] = max(last[sid], last_leaf[prefix])
    return last


def _simulate_training(steps: list[_Step], model: nn.Module, batch: int, amp: str, optimizer: str,
                       weights: int, inputs: int) -> Memory:
    """Replay one training step's allocations and frees; return its parts and peak."""
    act = ACT_BYTES[amp]
    param_bytes = sum(_bytes(p) for p in model.parameters())
    state = STATE_PER_PARAM[optimizer] * param_bytes
    weight_copies = 0
    if amp != "none":  # autocast's bfloat16 weight copies, kept for the backward pass
        weight_copies = sum(p.numel() * 2 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                            for p in m.parameters(recurse=False))
    classes = steps[-1].out_numel
    logits = batch * classes * (act + 4 + 4)  # the logits, their float32 copy and log-softmax for the loss

    savers: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        if s.saves_input:
            savers.setdefault(s.inp, []).append(i)
        if s.saves_output:
            savers.setdefault(s.out, []).append(i)
    last_use = _last_uses(steps)
    size: dict[int, int] = {}
    for s in steps:
        if s.out != s.inp:
            size[s.out] = batch * s.out_numel * act
    if amp != "none":
        size[-1] = batch * steps[0].in_numel * act  # the input's bfloat16 copy, kept by the first layer
        savers[-1] = [0]

    static = {"weights": weights, "optimizer state": state, "input batch": inputs}
    acts = "activations kept (at the peak)"
    now = {acts: weight_copies + size.get(-1, 0), "gradients": 0, "gradients in flight": 0}
    best = dict(now)  # the moment of the peak

    def mark() -> None:
        nonlocal best
        if sum(now.values()) > sum(best.values()):
            best = dict(now)

    alive: set[int] = {-1} if amp != "none" else set()
    mark()
    for i, s in enumerate(steps):  # forward
        if s.out != s.inp:
            now[acts] += size[s.out]
            alive.add(s.out)
        now[acts] += batch * s.extra
        mark()
        if s.inp in alive and s.inp not in savers and last_use[s.inp] <= i:
            now[acts] -= size[s.inp]
            alive.discard(s.inp)
    now[acts] += logits
    grad_out = batch * classes * act
    now["gradients in flight"] = grad_out
    mark()
    for i in range(len(steps) - 1, -1, -1):  # backward
        s = steps[i]
        view = s.out == s.inp and not s.saves_output
        grad_in = 0 if (view or not s.needs_grad_in) else batch * s.in_numel * act
        now["gradients in flight"] += grad_in
        now["gradients"] += sum(_bytes(p) for p in s.module.parameters(recurse=False))
        mark()
        if not view:
            now["gradients in flight"] -= grad_out
            grad_out = grad_in
        now[acts] -= batch * s.extra
        for sid in [sid for sid in alive if sid in savers and min(savers[sid]) == i]:
            now[acts] -= size[sid]
            alive.discard(sid)
    order = ("weights", "gradients", "optimizer state", "input batch", acts, "gradients in flight")
    parts = {k: {**static, **best}[k] for k in order}
    peak = sum(parts.values())
    return Memory(parts, peak)


def _simulate_inference(model: nn.Module, input_size: tuple[int, ...], batch: int, amp: str, inputs: int) -> Memory:
    """Peak of a forward pass in eval mode with no autograd (BatchNorm folded, as ``nin`` evaluates)."""
    act = ACT_BYTES[amp]
    shadow = copy.deepcopy(model).to("meta")
    if has_batchnorm(shadow):
        shadow = fold_batchnorm(shadow)
    weights = sum(_bytes(t) for t in (*shadow.parameters(), *shadow.buffers()))
    steps = _trace(shadow, input_size, train=False)
    last_use = _last_uses(steps)
    live = weights + inputs
    peak, most = live, 0
    held: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s.out != s.inp:
            held[s.out] = batch * s.out_numel * act
            live += held[s.out]
        # max pooling makes int64 indices even with no autograd, freed as soon as it returns
        transient = batch * s.out_numel * 8 if isinstance(s.module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) else 0
        if amp != "none" and isinstance(s.module, (nn.Conv2d, nn.Linear)):
            # autocast casts the layer's weights (and a float32 input) to bfloat16 for the call
            transient += sum(p.numel() for p in s.module.parameters(recurse=False)) * act
            transient += batch * s.in_numel * act if s.inp == 0 else 0
        peak = max(peak, live + transient)
        most = max(most, sum(held.values()) + transient)
        for sid in [sid for sid in held if last_use[sid] <= i]:
            live -= held.pop(sid)
    return Memory({"weights": weights, "input batch": inputs, "activations (largest live set)": most}, peak)
