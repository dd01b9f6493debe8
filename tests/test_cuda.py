"""The CUDA path, on a real NVIDIA GPU: skipped on machines without one (CI has none).

``bash benchmarks/gpu.sh`` runs these first. They cover what only a GPU shows: mixed precision with
torch.compile learning real Fashion-MNIST, fp16 with a gradient scaler, exact continuation of a run
from a mid-epoch checkpoint, CAM and export of a run trained on the GPU, and that a training step does
not wait for the GPU (host syncs are counted with CUDA's sync debug mode).
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from conftest import TOLERANCE

from nin.cli.main import main
from nin.training.callbacks.base import Callback
from nin.training.config import preset
from nin.training.precision import amp_choice
from nin.training.run import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (these run in benchmarks/gpu.sh)")]


def gpu_config(**train_settings):
    cfg = preset("default")
    cfg.device = "cuda"
    for k, v in train_settings.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, fashion_mnist):
    """The default recipe, one epoch on all 60,000 images, compiled, at the precision auto picks on this GPU."""
    cfg = gpu_config(epochs=1)
    out = tmp_path_factory.mktemp("cuda") / "run"
    return train(cfg, out, progress=False), out


def test_compiled_mixed_precision_training_learns_real_fashion_mnist(cuda_run):
    result, _ = cuda_run
    t = result.trainer
    assert t.device.type == "cuda" and t.config.compile
    assert t.config.amp == amp_choice(t.device)[0] != "none"  # bf16 from compute capability 8.0, else fp16
    assert (t.scaler is not None) == (t.config.amp == "fp16")
    (epoch,) = result.history
    assert epoch["test_acc"] > 0.85, epoch  # one epoch of the default recipe; 0.85 on a CPU too
    assert all(p.is_cuda and p.dtype == torch.float32 for p in t.model.parameters())


def test_fp16_with_a_gradient_scaler_learns_on_the_gpu(tmp_path, fashion_mnist):
    cfg = gpu_config(epochs=1, amp="fp16", compile=False)
    cfg.data.subset = 10_000
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.trainer.scaler is not None
    assert result.history[-1]["test_acc"] > 0.75, result.history


def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_where_the_straight_run_does(tmp_path, fashion_mnist):
    from safetensors.torch import load_file

    def cfg():
        c = gpu_config(epochs=2, compile=False)
        c.data.subset, c.data.test_subset = 6_400, 2_000  # 50 steps an epoch
        return c

    straight = train(cfg(), tmp_path / "straight", progress=False)
    part = cfg()
    part.train.max_steps = 75  # halfway through epoch 2
    train(part, tmp_path / "resumed", progress=False)
    resumed = train(cfg(), resume=tmp_path / "resumed", keep={"epochs": 2, "max_steps": None, "device": part.device},
                    progress=False)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history] == [50, 100]

    def last(run):
        return load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors")

    a, b = last(tmp_path / "resumed"), last(tmp_path / "straight")
    # cuDNN picks its algorithms per run and some sum in another order, so the weights agree to the rounding
    # of the precision in use rather than bit for bit (on a CPU they are bit for bit: tests/test_resume.py)
    worst = max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)) for k in b)
    assert worst < TOLERANCE[resumed.trainer.config.amp], worst
    assert resumed.history[-1]["test_acc"] == pytest.approx(straight.history[-1]["test_acc"], abs=0.01)


def test_cam_and_export_of_a_run_trained_on_the_gpu(cuda_run, tmp_path, capsys):
    _, run = cuda_run
    png = tmp_path / "cam.png"
    assert main(["cam", str(run), "--grid", "4", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fmt = "onnx" if importlib.util.find_spec("onnxruntime") else "torchscript"
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert out.stat().st_size > 0 and sidecar


class _SyncCounter(Callback):
    """Counts CUDA's sync warnings from the end of the first step to the end of the last one."""

    def __init__(self, caught: list) -> None:
        self.caught, self.first, self.last, self.steps = caught, None, None, 0

    def on_fit_start(self, trainer) -> None:
        torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, trainer, loss) -> None:
        n = sum("synchroniz" in str(w.message) for w in self.caught)
        self.first = n if self.first is None else self.first
        self.last, self.steps = n, self.steps + 1

    def on_fit_end(self, trainer) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_a_training_step_does_not_wait_for_the_gpu(tmp_path, fashion_mnist):
    """Between the first and the last of 200 steps the host waits for the GPU only at the finiteness checks
    (every 50 steps), never once a step. CUDA's sync debug mode warns at each synchronizing call."""
    cfg = gpu_config(epochs=1, compile=False)
    cfg.data.subset, cfg.data.test_subset = 200 * 128, 1_000
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counter = _SyncCounter(caught)
            train(cfg, tmp_path / "run", callbacks=[counter], progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = counter.last - counter.first
    print(f"{syncs} host syncs over steps 2 to {counter.steps} (check_every 50)")
    assert counter.steps == 200
    assert syncs <= counter.steps // 50, [str(w.message)[:160] for w in caught[:10]]
