"""Runs made by earlier versions keep working: they load, evaluate, predict and resume.

``tests/fixtures/run-0.1.0`` is a real run directory written by nin 0.1.0 as it was before the package
layout (commit 26ebd02): ``nin train --subset 1024 --test-subset 256 --epochs 1 --batch-size 64 --width 0.25
--amp none --checkpoint-every 8 --keep-last 0``, a quarter-width nin28 of 20 kB, on Fashion-MNIST, then
``nin evaluate`` on it (its ``evaluation.json``; the figures were left out to keep the fixture small).
It is never changed; the tests work on copies. A change of the run-directory or checkpoint format that
breaks it must come with a reader for the old one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from nin.cli.main import main
from nin.data.idx import DataError
from nin.data.sources import find_files
from nin.inference.trained import load_trained
from nin.training import checkpoint as ckpt

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        find_files("fashion-mnist", download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (scripts/install.sh installs it)")


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    return Path(shutil.copytree(FIXTURE, tmp_path / "run", symlinks=True))


def test_the_fixture_is_what_its_docstring_says():
    cfg = json.loads((FIXTURE / "config.json").read_text())["config"]
    assert cfg["model"] == {"name": "nin28", "options": {"width": 0.25}, "init": "kaiming"}
    assert [p.name for p in ckpt.list_checkpoints(FIXTURE)] == ["step-0000008", "step-0000016"]
    assert (FIXTURE / "checkpoints" / "best").is_symlink()


def test_an_old_run_loads(old_run):
    t = load_trained(old_run, "cpu")
    assert t.name == "nin28" and t.path.name == "step-0000016" and len(t.classes) == 10
    assert t.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_an_old_run_evaluates_as_the_old_version_did(old_run, fashion_mnist, tmp_path, capsys):
    """The same test accuracy and confusion matrix as nin 0.1.0's own ``nin evaluate``: to the image here, and
    within a handful of the 10,000 images on another CPU, whose fp32 kernels may round a near-tie otherwise."""
    old = json.loads((old_run / "checkpoints" / "step-0000016" / "evaluation.json").read_text())
    assert 0.2 < old["test_acc"] < 0.9  # a model that learned something, so the comparison means something
    assert main(["evaluate", str(old_run), "--device", "cpu", "--json", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 10_000
    moved = sum(abs(a - b) for row, old_row in zip(result["confusion"], old["confusion"]) for a, b in zip(row, old_row))
    assert moved <= 10 and abs(result["test_acc"] - old["test_acc"]) <= 5e-4


def test_an_old_run_predicts(old_run, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("L", (28, 28), 128).save(img)
    assert main(["predict", str(old_run), str(img), "--device", "cpu", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{img}: ")


@pytest.mark.slow
def test_an_old_run_resumes(old_run, fashion_mnist, capsys):
    assert main(["train", "--resume", str(old_run), "--epochs", "2", "--quiet", "--threads", "1"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(old_run)][-1] == "step-0000032"
    history = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == json.loads((FIXTURE / "metrics.jsonl").read_text())  # the old epoch, kept as it was
