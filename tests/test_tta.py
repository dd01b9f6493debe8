"""Test-time augmentation by horizontal flips (nin.inference.tta): the averaged probabilities, for every model and
under autocast; ``nin evaluate --tta`` and ``nin predict --tta``, what they write, the note for a run trained
without flips, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE, assert_one_error_line, image_folder, run_cli, snapshot
from PIL import Image
from torch import nn

from nin.cli.main import main
from nin.data.loader import DeviceLoader
from nin.inference.evaluate import evaluate_trained
from nin.inference.trained import load_trained
from nin.inference.tta import FlipTTA, tta_note, tta_probabilities
from nin.models import create_model, list_models
from nin.training.trainer import evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"  # flip: true (tests/test_compat.py)
CHEAP = ("nin28", "lenet")  # the other registered models take a quarter second or more at their input size


def by_hand(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).float().softmax(1) + model(x.flip(-1)).float().softmax(1)) / 2


def batch(model: nn.Module, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_size, generator=g)


@pytest.fixture
def nin28(one_thread) -> nn.Module:
    torch.manual_seed(0)
    return create_model("nin28").eval()


def test_tta_is_the_mean_of_the_softmax_of_the_image_and_its_mirror_image(nin28):
    x = batch(nin28)
    expected = by_hand(nin28, x)
    with torch.no_grad():
        got = tta_probabilities(nin28, x)
        logits = FlipTTA(nin28)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.dtype == torch.float32 and got.sum(1).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    torch.testing.assert_close(logits.softmax(1), expected)  # FlipTTA: the log of the same probabilities
    torch.testing.assert_close(logits.exp(), expected)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert not torch.allclose(expected, nin28(x).softmax(1))  # the mirror image changes something


def test_flip_tta_takes_the_mode_of_its_model_and_leaves_it_so(nin28):
    assert not FlipTTA(nin28).training and FlipTTA(nin28.train()).training
    nin28.eval()
    evaluate(FlipTTA(nin28), DeviceLoader(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2).long(), 2))
    assert not nin28.training  # evaluate() restores the wrapper's mode, and so the model's


def test_any_memory_format(nin28):
    x = batch(nin28)
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(tta_probabilities(nin28, cl), by_hand(nin28, cl), rtol=0, atol=0)
        torch.testing.assert_close(tta_probabilities(nin28, cl), tta_probabilities(nin28, x), rtol=1e-4, atol=1e-5)
        model = nin28.to(memory_format=torch.channels_last)
        torch.testing.assert_close(tta_probabilities(model, cl), by_hand(nin28, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n if n in CHEAP else pytest.param(n, marks=pytest.mark.slow) for n in list_models()])
def test_every_registered_model(name, one_thread):
    torch.manual_seed(0)
    model = create_model(name).eval()
    if name == "nin_d2l":  # its 224x224 input is slow on a CPU; 96 is the smallest size its stages take
        model.input_size = (1, 96, 96)
    x = batch(model, 1)
    with torch.no_grad():
        got = tta_probabilities(model, x)
    assert got.shape == (1, model.num_classes)
    torch.testing.assert_close(got, by_hand(model, x), rtol=0, atol=0)


def test_under_bf16_autocast_the_probabilities_are_float32_and_close_to_fp32(nin28):
    x = batch(nin28, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert nin28(x).dtype == torch.bfloat16  # the forward passes do run in bf16
        probs = tta_probabilities(nin28, x)
        logits = FlipTTA(nin28)(x)
    assert probs.dtype == logits.dtype == torch.float32
    assert probs.sum(1).tolist() == pytest.approx([1.0] * 8, abs=1e-5)
    torch.testing.assert_close(probs, by_hand(nin28, x), rtol=0, atol=TOLERANCE["bf16"])
    torch.testing.assert_close(logits.exp(), probs, rtol=1e-5, atol=1e-6)


class Symmetric(nn.Module):
    """A mirror-symmetric classifier: left-right symmetric kernels with symmetric padding, then global averages."""

    input_size, num_classes = (1, 12, 12), 5

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x))).mean((2, 3))


def test_a_mirror_symmetric_model_gives_the_same_probabilities_with_and_without_tta():
    model = Symmetric().eval()
    x = batch(model, 4)
    with torch.no_grad():
        plain = model(x).softmax(1)
        torch.testing.assert_close(model(x.flip(-1)).softmax(1), plain)  # it is symmetric
        torch.testing.assert_close(tta_probabilities(model, x), plain, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(FlipTTA(model)(x).softmax(1), plain, rtol=1e-6, atol=1e-7)


def test_a_loss_on_flip_tta_is_the_cross_entropy_of_the_averaged_probabilities(nin28):
    images, labels = (torch.arange(4 * 28 * 28) % 251).to(torch.uint8).view(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])
    loader = DeviceLoader(images, labels, 4)
    x, _ = next(iter(loader))
    expected = -by_hand(nin28, x)[torch.arange(4), labels].log().mean()
    result = evaluate(FlipTTA(nin28), loader)  # the trainer's evaluation takes it as a model like any other
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_flip_tta_stays_finite_where_a_probability_underflows():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1e4, 0, 0, 0], [0, 0, 0, 0], [-1e4, 0, 0, 0]]))
        model[1].bias.zero_()
        x = torch.ones(2, 1, 2, 2)
        assert tta_probabilities(model, x)[:, 2].eq(0).all()  # exp(-2e4) is 0 in float32
        logits = FlipTTA(model)(x)
    assert torch.isfinite(logits).all()
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.tensor([0, 2]))
    assert torch.isfinite(loss)


def test_tta_note_only_for_a_run_trained_without_flips():
    t = load_trained(FIXTURE, "cpu")
    assert t.config.data.flip and tta_note(t) is None
    t.config.data.flip = False
    note = tta_note(t)
    assert "never saw mirrored images" in note and str(t.path) in note and "\n" not in note


# ------------------------------------------------------------------ the commands


@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "run", symlinks=True))


def without_flips(run: Path) -> Path:
    """``run`` with its checkpoints' saved settings changed to data.flip false."""
    for meta in run.glob("checkpoints/step-*/meta.json"):
        doc = json.loads(meta.read_text())
        doc["config"]["data"]["flip"] = False
        meta.write_text(json.dumps(doc))
    return run


def test_predict_tta_gives_the_averaged_probabilities_of_the_runs_pipeline(old_run, tmp_path, capsys):
    pixels = (torch.arange(28 * 28) * 7 % 256).to(torch.uint8).view(28, 28)  # not mirror-symmetric
    Image.fromarray(pixels.numpy()).save(tmp_path / "a.png")
    t = load_trained(old_run, "cpu")
    x, _ = next(iter(t.loader(pixels.view(1, 1, 28, 28))))
    expected, plain = by_hand(t.model, x)[0], t.model(x).softmax(1)[0].detach()
    code, out, err = run_cli(capsys, "predict", old_run, tmp_path / "a.png", "--tta", "--top-k", "10", "--json",
                             "--device", "cpu")
    assert code == 0 and err == ""  # the run was trained with flips: no note
    doc = json.loads(out)
    assert doc["tta"] is True
    got = {p["class"]: p["probability"] for p in doc["predictions"][0]["top"]}
    assert [got[c] for c in t.classes] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [got[c] for c in t.classes] != pytest.approx(plain.tolist(), abs=1e-6)
    code, out, _ = run_cli(capsys, "predict", old_run, tmp_path / "a.png", "--tta", "--no-tta", "--json")
    assert code == 0 and json.loads(out)["tta"] is False  # the last one given counts; off by default


def test_tta_on_a_run_trained_without_flips_runs_with_one_note(old_run, tmp_path, capsys):
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    without_flips(old_run)
    code, out, err = run_cli(capsys, "predict", old_run, tmp_path / "a.png", "--tta", "--device", "cpu")
    assert code == 0 and out.startswith(f"{tmp_path / 'a.png'}: ")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nin: note: ") and "never saw mirrored images" in lines[0]
    code, _, err = run_cli(capsys, "predict", old_run, tmp_path / "a.png", "--device", "cpu")
    assert code == 0 and err == ""  # without --tta nothing to note


@pytest.mark.parametrize("argv,needles", [
    (["evaluate", "TMP/plain", "--tta"], ["TMP/plain"]),
    (["evaluate", "TMP/none", "--tta"], ["TMP/none", "no such file"]),
    (["predict", "TMP/plain", "TMP/a.png", "--tta"], ["TMP/plain"]),
    (["evaluate", "RUN", "--tta=yes"], ["--tta"]),
    (["predict", "RUN", "TMP/a.png", "--no-tta=no"], ["--no-tta"]),
])
def test_bad_tta_input_is_one_line(old_run, tmp_path, capsys, argv, needles):
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    (tmp_path / "plain").mkdir()  # a folder that is not a run
    before = snapshot(tmp_path)
    sub = {"TMP": str(tmp_path), "RUN": str(old_run)}

    def expand(a: str) -> str:
        for k, v in sub.items():
            a = a.replace(k, v)
        return a

    code, out, err = run_cli(capsys, *map(expand, argv))
    assert_one_error_line(code, out, err, *map(expand, needles))
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def flipless_run(tmp_path_factory) -> Path:
    """nin28 trained for a few steps with --no-flip on a 3-class image folder of 60 images (12 held out)."""
    root = tmp_path_factory.mktemp("tta")
    image_folder(root / "images", classes=3, per_class=20)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert main(["train", "--dataset", f"folder:{root / 'images'}", "--epochs", "1", "--batch-size", "8",
                     "--no-flip", "--threads", "1", "--amp", "none", "--out", str(root / "run"), "--quiet"]) == 0
    torch.set_num_threads(threads)
    return root / "run"


@pytest.mark.slow
def test_evaluate_tta_records_it_and_never_replaces_the_plain_evaluation(flipless_run, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "evaluate", flipless_run, "--out", out, "--json", "--device", "cpu")
    assert code == 0 and err == "" and json.loads(stdout)["tta"] is False
    plain = (out / "evaluation.json").read_bytes()
    code, stdout, err = run_cli(capsys, "evaluate", flipless_run, "--out", out, "--tta", "--json", "--device", "cpu")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("nin: note: ") and "never saw mirrored images" in err
    doc = json.loads((out / "evaluation-tta.json").read_text())
    assert json.loads(stdout) == doc and doc["tta"] is True and doc["confusion_png"] == str(out / "confusion-tta.png")
    assert (out / "confusion-tta.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "evaluation.json").read_bytes() == plain  # the plain one is kept beside it

    t = load_trained(flipless_run, "cpu")  # the same confusion matrix as the averaged probabilities give
    test = t.test_split()
    x, y = next(iter(t.loader(test.images, test.labels, 1000)))
    preds = by_hand(t.model, x).argmax(1)
    assert doc["examples"] == len(y) and doc["test_acc"] == pytest.approx(float((preds == y).float().mean()))
    assert doc["confusion"] == evaluate_trained(t, tta=True).confusion.tolist()

    before = snapshot(out)  # a second --tta evaluation replaces nothing without --force
    code, stdout, err = run_cli(capsys, "evaluate", flipless_run, "--out", out, "--tta", "--device", "cpu")
    assert_one_error_line(code, stdout, err, "confusion-tta.png", "--force")
    assert snapshot(out) == before
    code, stdout, err = run_cli(capsys, "evaluate", flipless_run, "--out", out, "--tta", "--force", "--device", "cpu")
    assert code == 0 and "with flip TTA: accuracy" in stdout and "confusion-tta.png" in stdout
    assert (out / "evaluation.json").read_bytes() == plain
