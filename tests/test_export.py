"""nin export: ONNX and TorchScript files that reproduce the trained model's logits, verified before they are kept."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nin.cli.main import main
from nin.inference.export import sample_inputs
from nin.inference.trained import load_trained


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


def reference_logits(run_dir, x):
    t = load_trained(run_dir, "cpu")
    mean, std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return t.model((x - mean) / std)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_at_any_batch_size_and_matches_pytorch(run_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "nin28.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx" in printed and "verified: max |logit difference|" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nin28.onnx", "nin28.onnx.json"]  # weights inside
    meta = json.loads((tmp_path / "nin28.onnx.json").read_text())
    assert meta["verified"]["max_abs_diff"] < 1e-4 and meta["classes"][0] == "T-shirt/top"

    x = sample_inputs(load_trained(run_dir, "cpu"), 5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, reference_logits(run_dir, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchscript_export_loads_back_and_matches_pytorch(run_dir, tmp_path, capsys):
    out = tmp_path / "nin28.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    x = sample_inputs(load_trained(run_dir, "cpu"), 3)
    with torch.no_grad():
        got = torch.jit.load(str(out))(x)
    torch.testing.assert_close(got, reference_logits(run_dir, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_an_existing_file_is_never_overwritten_without_force(run_dir, tmp_path, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"nin: error: {out}: cannot write: already exists; pass --force to replace it, "
                                       "or choose another --out\n")
    assert out.read_bytes() == b"keep me"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"keep me" and (tmp_path / "model.pt.json").is_file()


def test_a_failed_verification_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--tolerance", "1e-12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from PyTorch by" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_missing_onnxruntime_says_how_to_install_it(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'nin[export]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["export", "RUN", "--format", "tflite"], "invalid choice: 'tflite'"),
    (["export", "/no/such/run"], "/no/such/run"),
])
def test_bad_export_arguments_are_one_line(run_dir, capsys, argv, needle):
    assert main([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


@pytest.mark.slow
def test_the_sidecar_carries_the_model_card(run_dir, tmp_path, capsys):
    """What nin serve answers GET /v1/model with for an exported file: the run's card, read from the run."""
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    date = json.loads((run_dir / "config.json").read_text())["env"]["date"][:10]
    assert (meta["dataset"], meta["parameters"], meta["test_accuracy"], meta["trained"]) == (
        "fashion-mnist", 79_898, rows[-1]["test_acc"], date)
    assert meta["input"]["stored_size"] == [28, 28] and meta["input"]["shape"] == ["batch", 1, 28, 28]
    assert meta["cam"] is False and meta["class_maps"] is None  # one output unless --cam
    assert meta["test_accuracy_tta"] is False  # the run scored single forward passes (train.tta off)
    assert "class maps" not in capsys.readouterr().out


@pytest.mark.slow
def test_onnx_export_with_cam_adds_the_class_maps_as_a_second_output(run_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from nin.inference.cam import class_maps

    out = tmp_path / "cam.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--cam"]) == 0
    assert "and class maps [N, 10, h, w]" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cam.onnx.json").read_text())
    assert meta["cam"] is True and meta["class_maps"] == {"name": "class_maps", "shape": ["batch", 10, 7, 7]}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "class_maps"]
    t = load_trained(run_dir, "cpu")
    x = sample_inputs(t, 3)
    logits, maps = (torch.from_numpy(y) for y in session.run(None, {"images": x.numpy()}))
    mean, std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    want_logits, want_maps = class_maps(t.model, (x - mean) / std)
    torch.testing.assert_close(maps, want_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(maps.mean((2, 3)), logits, atol=1e-5, rtol=0)  # each map's mean is its logit


def test_cam_export_of_a_model_without_class_maps_is_refused_before_writing(run_dir, tmp_path):
    from dataclasses import replace

    from nin.errors import NinError
    from nin.inference.export import export
    from nin.models import create_model

    t = load_trained(run_dir, "cpu")
    fc = replace(t, model=create_model(t.name, head="fc").eval())
    with pytest.raises(NinError, match="fully connected head"):
        export(fc, "torchscript", tmp_path / "m.pt", torch.zeros(2, 1, 28, 28), cam=True)
    assert list(tmp_path.iterdir()) == []
