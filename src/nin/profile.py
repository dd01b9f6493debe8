"""Counting the work a model does.

FLOPs here are floating-point operations of the convolutions and matrix
products, counted by :class:`torch.utils.flop_counter.FlopCounterMode` from the
shapes alone (the model is copied to the ``meta`` device, so nothing is computed):

* a convolution with ``C_in`` input channels, a ``k x k`` kernel and an output of
  ``C_out x H_out x W_out`` costs ``2 * C_in * k * k * C_out * H_out * W_out`` per
  image in the forward pass (one multiply and one add per multiply-accumulate);
* training adds the backward pass: the gradient with respect to the weights
  (the same cost again) and with respect to the layer's input (the same cost
  again, except for the first layer, whose input needs no gradient), so a
  training step is close to 3x the forward FLOPs;
* element-wise work (ReLU, pooling, normalization, the optimizer) is not counted;
  it is a few percent of NiN's total.

For ``nin_d2l`` at 224x224 this gives 1.52 GFLOP per image forward and 4.51
GFLOP per image for a training step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    *,
    batch: int = 1,
    train: bool = False,
) -> int:
    """FLOPs of one forward pass (``train=False``) or one forward and backward pass over ``batch`` images.

    ``input_size`` is ``(C, H, W)``; by default the model's own ``input_size``.
    The model itself is not touched: a copy on the ``meta`` device is counted.
    """
    if input_size is None:
        input_size = tuple(model.input_size)  # type: ignore[arg-type]
    shadow = copy.deepcopy(model).to("meta")
    shadow.train(train)
    x = torch.empty(batch, *input_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        if train:
            shadow(x).float().sum().backward()
        else:
            with torch.no_grad():
                shadow(x)
    return int(counter.get_total_flops())
