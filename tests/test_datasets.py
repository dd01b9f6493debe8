"""Training on your own image folders through the `nin` command, the paper's whitening option, and the step
schedule of the nin-cifar10 recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from nin.cli.main import main
from nin.training.config import TrainConfig
from nin.training.trainer import lr_at


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def make_folder(root: Path, per_class: int = 12, bad: bool = False) -> Path:
    """Three classes of mixed PNG/JPEG files in different sizes and modes; each class has its own brightness."""
    modes = ["RGB", "L", "RGBA", "P", "LA"]
    for k, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, size = modes[i % len(modes)], (20 + 7 * i, 30 + 3 * k)
            img = Image.new("RGB", size, (40 + 90 * k, 40 + 90 * k, 40 + 90 * k)).convert(mode)
            fmt = "JPEG" if i % 2 and mode in ("RGB", "L") else "PNG"
            img.save(root / name / f"{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    if bad:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.mark.slow
def test_a_folder_of_mixed_images_trains_evaluates_and_reports_its_classes(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    code = main(["train", "--dataset", f"folder:{root}", "--test-fraction", "0.25", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads(next(out.glob("checkpoints/*/meta.json")).read_text())
    assert meta["data"]["classes"] == ["cat", "dog", "owl"] and meta["model"]["options"]["num_classes"] == 3
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 9 and set(result["per_class_acc"]) == {"cat", "dog", "owl"}  # 3 of 12 per class


def test_a_separate_test_folder_must_have_the_same_classes(capsys, tmp_path):
    train, test = make_folder(tmp_path / "train"), make_folder(tmp_path / "test", per_class=2)
    (test / "owl").rename(test / "bird")
    code = main(["train", "--data", f"folder:{train}", "--test-dir", str(test), "--epochs", "1",
                 "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(test) in err


def test_an_undecodable_image_fails_by_name_or_is_skipped_and_listed(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs", bad=True)
    argv = ["train", "--dataset", f"folder:{root}", "--epochs", "1", "--batch-size", "8", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--skip-bad-images" in err and err.count("\n") == 1
    assert main([*argv, "--skip-bad-images", "--out", str(tmp_path / "r2")]) == 0
    assert "skipped 1 undecodable image(s)" in capsys.readouterr().err
    doc = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert [Path(s["file"]).name for s in doc["skipped_images"]] == ["broken.png"]


@pytest.mark.slow
def test_whitening_is_fitted_saved_with_the_run_and_used_by_evaluate(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--whiten", "--epochs", "1", "--batch-size", "8",
                 "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "whitening.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    (out / "whitening.safetensors").write_bytes(b"junk")
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "whitening.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "folder:"], "needs a path"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", "folder:/no/such/dir"], "/no/such/dir"),
    (["--milestones", "0.8,0.5", "--schedule", "step"], "milestones"),
    (["--milestones", "half"], "--milestones"),
])
def test_bad_data_and_schedule_flags_are_one_line(capsys, tmp_path, argv, needle):
    assert main(["train", *argv, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_step_schedule_divides_the_lr_at_each_milestone_after_warm_up():
    cfg = TrainConfig(lr=0.1, schedule="step", warmup=0.1, milestones=(0.5, 0.75), gamma=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # linear warm-up over 10 steps
    assert lrs[49] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.01) and lrs[75] == pytest.approx(0.001)


def test_holdout_validates_on_training_images_the_same_for_every_seed(tmp_path):
    import numpy as np

    from nin.training.config import RunConfig
    from nin.training.run import build

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for k in range(3):  # every image distinct, so a shared row means a shared image
        (root / f"c{k}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    seen = []
    for seed in (0, 1):
        cfg = RunConfig.from_dict({"seed": seed, "model": {"name": "nin28"},
                                   "data": {"dataset": f"folder:{root}", "test_fraction": 0.2, "holdout": 6}})
        b = build(cfg)
        x_val, x_train = b.test_loader.images, b.train_loader.images
        assert len(x_val) == 6 and len(x_train) == 24 - 6  # 30 images, 6 tested, 6 held out of the 24 left
        rows_val = {bytes(r.numpy()) for r in x_val.flatten(1)}
        assert not rows_val & {bytes(r.numpy()) for r in x_train.flatten(1)}
        seen.append(rows_val)
    assert seen[0] == seen[1]


def test_holdout_larger_than_the_training_set_is_one_line(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    assert main(["train", "--dataset", f"folder:{root}", "--holdout", "500", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--holdout must be between 1 and" in err


def test_the_named_data_sets_are_a_registry_of_their_specs():
    """Shapes, class counts and sources come from each data set's own spec, and loading goes through its
    entry, so a data set is added in one place."""
    from nin.data import NAMES, cifar, idx

    assert list(NAMES) == ["fashion-mnist", "mnist", "cifar10", "cifar100"]
    assert NAMES["fashion-mnist"].spec is idx.FASHION_MNIST and NAMES["cifar100"].spec is cifar.CIFAR100
    for name, entry in NAMES.items():
        assert entry.name == name and entry.image_shape == entry.spec.image_shape
    assert [NAMES[n].num_classes for n in NAMES] == [10, 10, 10, 100]
    assert NAMES["cifar10"].load is cifar.load
