"""Export a trained model for deployment, and prove the export right: ``nin export``.

The exported graph is :class:`Deployable`: it takes float images scaled to 0-1 at the
model's input size, ``[N, C, H, W]`` with any batch size N, applies the run's own
normalization (or whitening), runs the model with BatchNorm folded into its
convolutions, and returns the logits. Formats:

* ``onnx``: through ``torch.onnx.export`` (the ``torch.export``-based exporter) with a
  dynamic batch dimension; verified by running it in onnxruntime.
* ``torchscript``: ``torch.jit.trace`` of the same module; verified by loading it back.

The reference is the model as trained (BatchNorm not folded), so the check covers the
folding too.

Verification runs the exported file on real test images, at two batch sizes, and
compares its logits with PyTorch's: the largest absolute difference must be below
``tolerance`` (1e-4 in fp32). A sidecar ``.json`` records classes, input layout and
the measured difference, and the model's card (:mod:`nin.inference.card`: data set, parameters, the run's
test accuracy and training date, the stored image size), which ``nin serve`` answers with for the file.

``cam=True`` (``nin export --cam``) adds a second output, ``class_maps`` ``[N, classes, h, w]``: the last
block's maps, whose means are the logits (:mod:`nin.inference.cam`), verified like the logits, so that
``nin serve`` can draw class activation maps from the file alone. It is off by default: the file then has
one output, as it always had.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nin.atomic import atomic_paths, refuse_existing
from nin.data.loader import _per_channel
from nin.errors import NinError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class Deployable(nn.Module):
    """0-1 images at the model's input size -> logits (and, with ``maps``, the class maps): normalization (or
    whitening) and the model in one graph."""

    def __init__(self, model: nn.Module, mean, std, whitening: nn.Module | None = None, maps: bool = False) -> None:
        super().__init__()
        c = model.input_size[0]
        self.model = model
        self.whitening = whitening
        self.maps = maps
        self.register_buffer("mean", torch.tensor(_per_channel(mean, c)).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(_per_channel(std, c)).view(1, c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.whitening(images) if self.whitening is not None else (images - self.mean) / self.std
        if self.maps:
            maps = self.model.forward_features(x)  # (N, classes, h, w)
            return self.model.forward_head(maps), maps
        return self.model(x)  # (N, classes) logits


@dataclass
class Exported:
    path: Path
    format: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


def deployable(trained, maps: bool = False) -> Deployable:
    from nin.models.fold import fold_batchnorm, has_batchnorm

    model = trained.model.eval()
    if has_batchnorm(model):
        model = fold_batchnorm(model)
    whitening = trained.whitening
    if whitening is not None and not isinstance(whitening, nn.Module):
        raise NinError("this run's whitening cannot be exported")
    return Deployable(model.float().cpu().eval(), trained.mean, trained.std,
                      whitening.cpu() if whitening is not None else None, maps).eval()


def sample_inputs(trained, n: int = 16) -> torch.Tensor:
    """``n`` real test images of the run, 0-1 at the model's input size (CPU)."""
    from nin.data.loader import DeviceLoader

    images = trained.test_split().images[:n]
    return DeviceLoader(images, torch.zeros(len(images), dtype=torch.long), n, size=trained.size).transform(images)


def export(trained, fmt: str, out: str | os.PathLike, inputs: torch.Tensor, tolerance: float = 1e-4, *,
           force: bool = False, cam: bool = False) -> Exported:
    """Write ``trained`` as ``fmt`` to ``out`` (and ``out.json``), then verify it on ``inputs``; existing files are
    never replaced unless ``force``. ``cam``: a second output, the class maps (a NiN with a GAP head only)."""
    from nin.inference.card import model_card

    if fmt not in FORMATS:
        raise NinError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    refuse_existing(out, sidecar, force=force)
    if cam:
        from nin.inference.cam import check_cam_model

        check_cam_model(trained.model)
    module = deployable(trained, cam)
    reference = Deployable(trained.model.float().cpu().eval(), trained.mean, trained.std,  # unfolded, as trained
                           maps=cam)
    # Both files are written to temporary names and moved into place together once verified: a failure (a
    # mismatch, a full disk) leaves neither behind.
    with atomic_paths(out, sidecar, exclusive=not force) as (tmp, tmp_meta):
        if fmt == "onnx":
            _export_onnx(module, inputs[:2], tmp, cam)
            run = _onnx_runner(tmp)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(module, inputs[:2])
            buffer = io.BytesIO()  # TorchScript's own file writer aborts the process on a full disk
            torch.jit.save(traced, buffer)
            with open(tmp, "wb") as f:
                f.write(buffer.getvalue())
            loaded = torch.jit.load(str(tmp))
            run = lambda x: _outputs(loaded(x))  # noqa: E731
        sizes = (1, len(inputs))
        diff = 0.0
        with torch.no_grad():
            for n in sizes:  # a batch size other than the traced one proves the batch dimension is dynamic
                got, want = run(inputs[:n]), _outputs(reference(inputs[:n]))
                if [g.shape for g in got] != [w.shape for w in want]:
                    raise NinError(f"exported model gave shapes {[tuple(g.shape) for g in got]} for batch {n}, "
                                   f"expected {[tuple(w.shape) for w in want]}")
                diff = max(diff, *(float((g.detach() - w).abs().max()) for g, w in zip(got, want)))
        if not diff < tolerance:
            raise NinError(f"exported {fmt} model differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}); "
                           "nothing was written")
        card = model_card(trained)
        stored = card["input"]
        maps_shape = ["batch", *want[1].shape[1:]] if cam else None  # the reference's, as verified above
        meta = {"format": fmt, "model": trained.name, "checkpoint": str(trained.path),
                "classes": list(trained.classes),
                "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
                          "shape": ["batch", *trained.model.input_size],
                          "stored_size": [stored["height"], stored["width"]]},
                "output": {"name": "logits", "shape": ["batch", len(trained.classes)]},
                "class_maps": {"name": "class_maps", "shape": maps_shape} if cam else None,
                "cam": cam, "dataset": card["dataset"], "parameters": card["parameters"],
                "test_accuracy": card["test_accuracy"], "test_accuracy_tta": card["test_accuracy_tta"],
                "trained": card["trained"],
                "verified": {"max_abs_diff": diff, "tolerance": tolerance, "batch_sizes": list(sizes)}}
        with open(tmp_meta, "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
    return Exported(out, fmt, diff, sizes)


def _outputs(y) -> tuple[torch.Tensor, ...]:
    """A module's output as a tuple: (logits,) or (logits, class maps)."""
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, maps: bool = False) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise NinError("ONNX export needs onnx and onnxscript: pip install 'nin[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a warning for each torchvision op it cannot register
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # and prints its progress
            warnings.simplefilter("ignore")
            outputs = ["logits", "class_maps"] if maps else ["logits"]
            torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=outputs,
                              dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                              external_data=False)  # one self-contained file, weights inside
    finally:
        quiet.setLevel(level)


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise NinError("verifying an ONNX export needs onnxruntime: pip install 'nin[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: tuple(torch.from_numpy(y) for y in session.run(None, {name: x.numpy()}))
