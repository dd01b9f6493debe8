"""The model behind ``nin serve``: a trained run in PyTorch, or an ONNX file in onnxruntime, behind one interface.

A backend has a ``card`` (the dict ``GET /v1/model`` starts from: :func:`nin.inference.card.model_card`),
``classes``, ``channels``, ``stored_size`` (the (H, W) a request's image is decoded to), ``cam`` (whether it
has class maps) and ``infer(images, maps)``: uint8 ``[N, C, H, W]`` at the stored size -> softmax
probabilities float32 ``[N, K]`` and, with ``maps``, the class maps float32 ``[N, K, h, w]`` (else None).
``infer`` is called from one worker thread at a time (:mod:`nin.serve.batcher`).

* :class:`TorchBackend`: a run or checkpoint through :func:`nin.inference.trained.load_trained`, each batch
  through the run's own pipeline (``trained.loader``: resize, normalize or whiten) as ``nin predict`` does, and
  the model as ``nin export`` deploys it (BatchNorm folded; channels-last on a CPU), traced into one
  TorchScript graph that runs without the GIL (:mod:`nin.serve.graph`), so its answers are ``nin predict``'s
  up to rounding (about 1e-7 in a probability).
* :class:`OnnxBackend`: a file written by ``nin export --format onnx``, read with its sidecar ``FILE.onnx.json``
  (classes, stored size, the card; ``--cam`` files have a second output, the class maps). Its graph holds the
  normalization, so a batch is scaled to 0-1 and resized to the model's input size (bilinear, as
  ``torch.nn.functional.interpolate``) here, in numpy. This path imports no torch.

A model that cannot be loaded is a :class:`~nin.errors.NinError`: one line when the server starts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from nin.errors import NinError
from nin.files import read_json, read_regular
from nin.inference.card import VERSION_HEX  # (that module imports no torch)

ONNX_SUFFIX = ".onnx"
MAX_SIDECAR_BYTES = 16 * 2**20  # a sidecar holds classes and a few numbers
MAX_ONNX_BYTES = 2**31  # protobuf's limit on one self-contained ONNX file


def load_backend(path: str | os.PathLike, config):
    """The backend for ``path``: an ``.onnx`` file, else a run or checkpoint directory."""
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        return OnnxBackend(Path(path), config)
    return TorchBackend(path, config)


def serving_threads() -> int:
    """Threads for the forward pass when ``--threads`` is not given: the CPUs this process may use, less one for
    the event loop that reads, decodes and answers requests meanwhile (at least one)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float ``[N, C, H, W]`` resized to ``size`` as ``F.interpolate(x, size, mode="bilinear",
    align_corners=False)`` does (half-pixel centres, no antialiasing)."""
    for axis, (n_in, n_out) in ((2, (x.shape[2], size[0])), (3, (x.shape[3], size[1]))):
        if n_in == n_out:
            continue
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
    return x.astype(np.float32)


class TorchBackend:
    """A trained run or checkpoint, in PyTorch."""

    runtime = "torch"

    def __init__(self, path: str | os.PathLike, config) -> None:
        import torch

        from nin.inference.cam import check_cam_model
        from nin.inference.card import model_card
        from nin.inference.trained import load_trained

        torch.set_num_threads(config.threads or serving_threads())
        self.trained = load_trained(path, config.device)
        self.card: dict[str, Any] = {**model_card(self.trained), "runtime": self.runtime}
        self.classes = list(self.trained.classes)
        self.channels, self.stored_size = self.trained.stored_shape()
        try:
            check_cam_model(self.trained.model)
            self.cam = True
        except NinError:
            self.cam = False
        self.path = self.trained.path
        # the run's input pipeline and the model as nin export deploys it, as one TorchScript graph per output
        # (nin.serve.graph): it runs without the GIL, beside the event loop
        from nin.serve.graph import compile_graph

        device = next(self.trained.model.parameters()).device
        example = torch.zeros(2, self.channels, *self.stored_size, dtype=torch.uint8, device=device)
        pipeline = self.trained.loader(example[:1])
        self.device = device
        self.graphs = {maps: compile_graph(pipeline, self.trained.model, maps, example)
                       for maps in ((False, True) if self.cam else (False,))}

    def infer(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.inference_mode():
            out = self.graphs[maps](torch.from_numpy(images).to(self.device))
            logits, m = out if maps else (out, None)
            probs = logits.float().softmax(1).cpu().numpy()
        return probs, (m.float().cpu().numpy() if m is not None else None)


class OnnxBackend:
    """A file exported by ``nin export --format onnx``, in onnxruntime; no torch."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, config) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise NinError("serving an ONNX file needs onnxruntime: pip install 'nin[export]'") from None
        self.path = path
        data = read_regular(path, MAX_ONNX_BYTES, error=NinError)  # a regular file only: never a FIFO
        meta = _sidecar(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads or serving_threads()
        # its threads would otherwise spin between runs, taking the CPU the event loop needs (several ms of CPU
        # per forward pass at one request every few ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=_providers(ort, config.device))
        except Exception as e:  # noqa: BLE001  onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise NinError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
        self.input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.cam = bool(meta.get("cam")) and "class_maps" in outputs
        if "logits" not in outputs:
            raise NinError(f"{path}: no 'logits' output; not a file nin export wrote")
        self.classes, shape = meta["classes"], meta["input"]["shape"]
        logits = next(o for o in self.session.get_outputs() if o.name == "logits").shape
        if len(logits) != 2 or logits[1] != len(self.classes):
            raise NinError(f"{path}: its logits are {logits}, but {path.name}.json names {len(self.classes)} classes")
        self.channels, self.size = shape[1], (shape[2], shape[3])
        self.stored_size = tuple(meta["input"].get("stored_size") or self.size)
        version = hashlib.sha256(data).hexdigest()[:VERSION_HEX]  # as a run's: of the weights' file
        self.card: dict[str, Any] = {
            "name": meta["model"], "version": version, "parameters": meta.get("parameters"),
            "dataset": meta.get("dataset"), "classes": list(self.classes),
            "input": {"channels": self.channels, "height": self.stored_size[0], "width": self.stored_size[1]},
            "test_accuracy": meta.get("test_accuracy"), "test_accuracy_tta": bool(meta.get("test_accuracy_tta")),
            "trained": meta.get("trained"), "runtime": self.runtime}

    def infer(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        x = images.astype(np.float32) / np.float32(255.0)
        if tuple(x.shape[2:]) != self.size:
            x = resize_bilinear(x, self.size)
        names = ["logits", "class_maps"] if maps else ["logits"]
        out = self.session.run(names, {self.input: np.ascontiguousarray(x)})
        return softmax(out[0].astype(np.float32)), (out[1].astype(np.float32) if maps else None)


def _providers(ort, device: str) -> list[str]:
    if device in ("auto", "cpu"):
        return ["CPUExecutionProvider"]
    if device.split(":")[0] == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise NinError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise NinError(f"--device for an ONNX file must be auto, cpu or cuda, got {device!r}")


def _sidecar(path: Path) -> dict:
    """``FILE.onnx.json``, checked for what serving needs: model name, classes, input shape."""
    side = path.with_name(path.name + ".json")
    if not side.exists():
        raise NinError(f"{path}: no {side.name} beside it (the sidecar nin export writes: classes, input size)")
    meta = read_json(side, MAX_SIDECAR_BYTES, error=NinError)
    meta = meta if isinstance(meta, dict) else {}
    given = meta.get("input") if isinstance(meta.get("input"), dict) else {}
    classes, shape, stored = meta.get("classes"), given.get("shape"), given.get("stored_size")

    def sides(v, n) -> bool:
        return isinstance(v, list) and len(v) == n and all(isinstance(d, int) and 0 < d <= 65536 for d in v)

    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)
            and isinstance(meta.get("model"), str) and isinstance(shape, list) and len(shape) == 4
            and sides(shape[1:], 3) and (stored is None or sides(stored, 2))):
        raise NinError(f"{side}: not a sidecar nin export wrote (it needs model, classes and input.shape)")
    return meta
