"""The same networks as Keras 3 models, with trained weights copied over.

:func:`build` builds a registered NiN with ``create_model`` and translates it layer by
layer into a Keras functional model, so the PyTorch spec stays the one definition of
each architecture. :func:`from_torch` does the same for a trained checkpoint and
copies its weights. Keras models take channels-last input ``[N, H, W, C]``; each
layer keeps the PyTorch module's name (``block1_0`` for ``features.block1.0``).

Keras runs on its torch backend unless ``KERAS_BACKEND`` says otherwise (``tensorflow``
or ``jax`` work where installed). Keras is an optional dependency: ``pip install keras``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from nin.errors import NinError
from nin.models import create_model
from nin.models.nin import NiN
from nin.models.specs import conv_out_size


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise NinError("the Keras port needs Keras 3: pip install keras (or pip install 'nin[keras]')") from None
    return keras


def build(name: str, **overrides):
    """A Keras model of the registered NiN ``name`` (same options as ``create_model``), freshly initialized."""
    return convert(create_model(name, **overrides), copy_weights=False)


def from_torch(checkpoint) -> tuple:
    """The Keras model of a trained checkpoint (or run directory) with its weights, and the run's class names."""
    from nin.inference.trained import load_trained

    t = load_trained(checkpoint, "cpu")
    return convert(t.model, copy_weights=True), list(t.classes)


def convert(model: nn.Module, copy_weights: bool = True):
    """Translate a NiN into a Keras functional model; with ``copy_weights``, copy its parameters and BN statistics."""
    keras = _keras()
    L = keras.layers
    if not isinstance(model, NiN):
        raise NinError(f"the Keras port covers the NiN models; got {type(model).__name__}")
    c, h, w = model.input_size
    inputs = keras.Input((h, w, c), name="images")
    x = inputs
    pairs: list[tuple[nn.Module, object]] = []
    nonnegative = False  # whether x >= 0 here (after a ReLU): zero padding is then exact for max pooling
    for stage, module in model.features.named_children():
        layers = list(module) if isinstance(module, nn.Sequential) else [module]
        for i, m in enumerate(layers):
            name = f"{stage}_{i}" if isinstance(module, nn.Sequential) else stage
            if isinstance(m, nn.Conv2d):
                (k, _), (s, _), (p, _) = m.kernel_size, m.stride, m.padding
                if p:
                    x = L.ZeroPadding2D(p, name=f"{name}_pad")(x)
                layer = L.Conv2D(m.out_channels, k, strides=s, use_bias=m.bias is not None, name=name)
                x = layer(x)
                h, w = (conv_out_size(v, k, s, p) for v in (h, w))
                pairs.append((m, layer))
                nonnegative = False
            elif isinstance(m, nn.BatchNorm2d):
                layer = L.BatchNormalization(axis=-1, epsilon=m.eps, momentum=1 - (m.momentum or 0.1), name=name)
                x = layer(x)
                pairs.append((m, layer))
                nonnegative = False
            elif isinstance(m, nn.ReLU):
                x = L.ReLU(name=name)(x)
                nonnegative = True
            elif isinstance(m, nn.MaxPool2d):
                k, s, p = m.kernel_size, m.stride, m.padding
                out_h, out_w = (conv_out_size(v, k, s, p, m.ceil_mode) for v in (h, w))
                extra_h, extra_w = ((o - 1) * s + k - (v + 2 * p) for o, v in ((out_h, h), (out_w, w)))
                if p or extra_h > 0 or extra_w > 0:
                    if not nonnegative:
                        raise NinError(f"{stage}: padded max pooling of inputs that may be negative has no exact "
                                       "Keras equivalent")
                    x = L.ZeroPadding2D(((p, p + max(extra_h, 0)), (p, p + max(extra_w, 0))), name=f"{name}_pad")(x)
                x = L.MaxPooling2D(k, strides=s, padding="valid", name=name)(x)
                h, w = out_h, out_w
            elif isinstance(m, nn.Dropout):
                x = L.Dropout(m.p, name=name)(x)
            else:
                raise NinError(f"{stage}: no Keras equivalent for {type(m).__name__}")
    if hasattr(model.head, "gap"):
        x = L.GlobalAveragePooling2D(name="gap")(x)  # (N, classes): the mean of each class map
    else:
        fc = model.head.fc
        x = L.Permute((3, 1, 2), name="to_channels_first")(x)  # flatten in PyTorch's (C, H, W) order
        x = L.Flatten(name="flatten")(x)
        layer = L.Dense(fc.out_features, name="fc")
        x = layer(x)
        pairs.append((fc, layer))
    kmodel = keras.Model(inputs, x, name=type(model).__name__.lower())
    if copy_weights:
        for m, layer in pairs:
            layer.set_weights(_weights(m))
    return kmodel


def _weights(m: nn.Module) -> list[np.ndarray]:
    """A PyTorch layer's tensors in the order and layout its Keras counterpart takes them."""
    with torch.no_grad():
        if isinstance(m, nn.Conv2d):  # (out, in, kh, kw) -> (kh, kw, in, out)
            ws = [m.weight.permute(2, 3, 1, 0)] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, nn.BatchNorm2d):
            ws = [m.weight, m.bias, m.running_mean, m.running_var]
        else:  # nn.Linear: (out, in) -> (in, out)
            ws = [m.weight.t(), m.bias]
        return [w.detach().cpu().float().contiguous().numpy() for w in ws]
