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
