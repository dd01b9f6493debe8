"""The forward pass of ``nin serve``'s torch backend as one TorchScript graph, from uint8 images to logits.

The graph holds the run's input pipeline (``DeviceLoader.transform``: scale to 0-1, resize, normalize or whiten,
as ``nin predict`` does) and the model as ``nin export`` deploys it (BatchNorm folded into the convolutions;
channels-last on a CPU, where oneDNN runs these convolutions faster). It is traced and frozen once, at
start-up, for each output the server needs (the logits, and the logits with the class maps).

Why a graph rather than the module itself: the forward pass runs in a worker thread while the event loop
parses and answers requests. An eager module needs the GIL between every two operations, and under load the
event loop holds it, so each hand-over can wait for Python's switch interval, many times per pass. A
TorchScript graph runs without the GIL from its first operation to its last. ``benchmarks/serve_load.py``
shows the effect as its "fwd ms/req" column (forward time per request under load). The traced graph's
outputs are the eager module's, bit for bit on a CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nin.models.fold import fold_batchnorm, has_batchnorm


class Served(nn.Module):
    """uint8 ``[N, C, H, W]`` at the stored size -> logits ``[N, K]`` (and, with ``maps``, the class maps)."""

    def __init__(self, pipeline, model: nn.Module, maps: bool, channels_last: bool) -> None:
        super().__init__()
        self.pipeline, self.model, self.maps, self.channels_last = pipeline, model, maps, channels_last

    def forward(self, images: torch.Tensor):
        x = self.pipeline.transform(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.maps:
            maps = self.model.forward_features(x)  # (N, classes, h, w): each map's mean is its logit
            return self.model.forward_head(maps), maps
        return self.model(x)


def deployed(model: nn.Module, device: torch.device) -> tuple[nn.Module, bool]:
    """``model`` as it is served: BatchNorm folded (a copy), channels-last on a CPU; and whether it is."""
    model = fold_batchnorm(model) if has_batchnorm(model) else model.eval()
    channels_last = device.type == "cpu"
    return (model.to(memory_format=torch.channels_last) if channels_last else model), channels_last


def compile_graph(pipeline, model: nn.Module, maps: bool, example: torch.Tensor):
    """The frozen TorchScript graph of :class:`Served` traced on ``example`` (uint8 images; any batch size works
    after), or the eager module if this model cannot be traced (its answers are the same, only slower)."""
    served_model, channels_last = deployed(model, example.device)
    module = Served(pipeline, served_model, maps, channels_last).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks (fixed per run)
            graph = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
            graph(example)  # the first calls optimize the graph: before any request, not during one
            graph(example)
        return graph
    except Exception:  # noqa: BLE001  any tracing failure: serve the module as it is
        return module
