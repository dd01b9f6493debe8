"""Each stage's output shape and parameter count: the chapter's printout of the network, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nin.errors import NinError


@dataclass(frozen=True)
class StageShape:
    name: str  # block1, pool1, ..., gap, flatten
    layer: str  # the module's class
    shape: tuple[int, ...]  # the output of one image, batch dimension left out
    params: int


@torch.no_grad()
def stage_shapes(model: nn.Module, name: str = "") -> list[StageShape]:
    """Run one random image of ``model.input_size`` through ``model.named_stages()`` in eval mode; an input
    too small for the network is a one-line NinError naming the stage where it ran out."""
    c, h, w = model.input_size
    x = torch.rand(1, c, h, w)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for stage_name, stage in model.named_stages():
            try:
                x = stage(x)
            except RuntimeError as e:
                raise NinError(f"input {c}x{h}x{w} is too small for {name or type(model).__name__}: stage "
                               f"{stage_name} failed ({str(e).splitlines()[0]})") from None
            rows.append(StageShape(stage_name, type(stage).__name__, tuple(x.shape[1:]),
                                   sum(p.numel() for p in stage.parameters())))
    finally:
        model.train(was_training)
    return rows
