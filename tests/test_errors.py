"""Bad input everywhere: for every command, a user's mistake or a refusing file system is one line
``nin: error: ...`` and a non-zero exit, never a traceback, never a half-written output, and nothing that
was already saved is changed. A data file changed under a cache is never served stale."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from conftest import assert_one_error_line as assert_error
from conftest import image_folder, make_cifar_archive, snapshot
from conftest import run_cli as run
from PIL import Image

from nin.atomic import WriteError
from nin.cli.main import main
from nin.data import cifar, folder, sources
from nin.data import idx as data
from nin.errors import NinError

# ---------------------------------------------------------------------- helpers


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_fsync(monkeypatch, *names: str) -> None:
    """The disk fills up when a file named in ``names`` (or its temporary copy) is flushed to it."""
    real = os.fsync
    pattern = re.compile("|".join(rf"\.?{re.escape(n)}(\.\d+)?(\.tmp)?" for n in names))

    def fsync(fd):
        if pattern.fullmatch(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))):
            raise full_disk()
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def fail_savefig(monkeypatch) -> None:
    """The disk fills up half way through writing a figure: half a PNG is on disk when the error comes."""
    def savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    threads = torch.get_num_threads()  # --threads 1 below sets it for the process: give it back
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    """A run trained for three steps on a small image folder (nin28, 3 classes): a checkpoint for evaluate,
    predict, cam and export that needs no downloaded data and evaluates in a moment."""
    out = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        code = main(["train", "--dataset", f"folder:{images}", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                     "--no-channels-last", "--out", str(out), "--quiet"])
    torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Images unlike the run's 1x28x28 ones: RGB of another size and aspect, a 5x5 one, RGBA."""
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    out = {"rgb": d / "rgb.png", "tiny": d / "tiny.png", "rgba": d / "rgba.png"}
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(out["rgb"])
    Image.fromarray(rng.integers(0, 255, (5, 5), dtype=np.uint8)).save(out["tiny"])
    Image.fromarray(rng.integers(0, 255, (28, 28, 4), dtype=np.uint8)).save(out["rgba"])
    return out


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file where an output folder would have to be (root ignores chmod; this it cannot write into)."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


def expand(argv, **paths) -> list[str]:
    """Replace the upper-case words in ``argv`` (TMP, RUN, ...) by the paths given."""
    out = []
    for a in argv:
        for k, v in paths.items():
            a = a.replace(k, str(v))
        out.append(a)
    return out


# ---------------------------------------------------------------------- invalid flag values, every command

FLAGS = [
    (["models", "--json", "extra"], ["unrecognized arguments: extra"]),
    (["datasets", "--data-dir"], ["--data-dir", "expected one argument"]),
    (["shapes", "NIN28"], ["unknown model 'NIN28'", "did you mean 'nin28'"]),
    (["shapes", "nin28", "--input", "3x8x8"], ["takes 1 input channel", "--in-channels 3"]),
    (["shapes", "nin_d2l", "--input", "1x8x8"], ["input 8x8 is too small"]),
    (["shapes", "nin28", "--input", "1x0x8"], ["--input", "sides from 1 to 4096", "'1x0x8'"]),
    (["shapes", "nin28", "--input", "1x2x3x4"], ["--input", "CxHxW"]),
    (["shapes", "nin28", "--input", "3x-8"], ["--input", "'3x-8'"]),
    (["shapes", "nin28", "--width", "nan"], ["--width", "expected a number in [0.0625, 8], got 'nan'"]),
    (["shapes", "nin28", "--width", "0"], ["--width", "expected a number in [0.0625, 8]"]),
    (["shapes", "nin28", "--dropout", "1.5"], ["--dropout", "expected a number in [0, 1)"]),
    (["shapes", "nin28", "--num-classes", "0"], ["--num-classes", "expected an integer in [1, 100,000]"]),
    (["shapes", "nin28", "--mlp-layers", "two"], ["--mlp-layers", "expected an integer in [0, 3]"]),
    (["shapes", "nin28", "--head", "mlp"], ["--head", "invalid choice: 'mlp'"]),
    (["shapes", "lenet", "--head-width", "8"], ["lenet does not take the option(s) head_width"]),
    (["profile", "nin28:width=1,depth", "--no-measure"], ["NAME:key=value"]),
    (["profile", "nin28:width=1.5.2", "--no-measure"], ["'1.5.2'", "not a number"]),
    (["profile", "nin28:mlp_layers=9", "--no-measure"], ["mlp_layers must be 0, 1, 2 or 3"]),
    (["profile", "nin28", "--optimizer", "adam"], ["--optimizer", "invalid choice: 'adam'"]),
    (["profile", "nin28", "--device", "tpu", "--no-measure"], ["unknown device 'tpu'"]),
    (["profile", "nin28", "--batch", "-1"], ["--batch", "'-1'"]),
    (["train", "--model", "nin_28", "--out", "TMP/run"], ["unknown model 'nin_28'", "did you mean 'nin28'"]),
    (["train", "--dataset", "fashion_mnist", "--out", "TMP/run"], ["did you mean 'fashion-mnist'"]),
    (["train", "--lr", "nan", "--out", "TMP/run"], ["--lr", "'nan'"]),
    (["train", "--weight-decay", "inf", "--out", "TMP/run"], ["--weight-decay", "'inf'"]),
    (["train", "--warmup", "1.5", "--out", "TMP/run"], ["--warmup", "expected a number in [0, 1)"]),
    (["train", "--label-smoothing", "-0.1", "--out", "TMP/run"], ["--label-smoothing", "expected a number in [0, 1)"]),
    (["train", "--test-subset", "0", "--out", "TMP/run"], ["--test-subset", "expected an integer in [1, 10**9]"]),
    (["train", "--crop-padding", "-1", "--out", "TMP/run"], ["--crop-padding", "expected an integer in [0, 64]"]),
    (["train", "--init", "he", "--out", "TMP/run"], ["--init", "invalid choice: 'he'"]),
    (["train", "--amp", "fp8", "--out", "TMP/run"], ["--amp", "invalid choice: 'fp8'"]),
    (["train", "--resume", "TMP/nothing"], ["TMP/nothing", "no such file"]),
    (["train", "--resume", "TMP"], ["not a run directory (no config.json)"]),
    # contradictory flags: one of them would be ignored without a word
    (["train", "--test-dir", "TMP", "--out", "TMP/run"], ["--test-dir is for image folders"]),
    (["train", "--skip-bad-images", "--out", "TMP/run"], ["--skip-bad-images is for image folders"]),
    (["train", "--dataset", "folder:IMAGES", "--test-dir", "IMAGES", "--test-fraction", "0.3", "--out", "TMP/run"],
     ["--test-fraction", "--test-dir", "give one of them"]),
    (["train", "--milestones", "0.5", "--out", "TMP/run"], ["--milestones applies to --schedule step"]),
    (["train", "--schedule", "cosine", "--gamma", "0.5", "--out", "TMP/run"], ["--gamma applies to --schedule step"]),
    (["train", "--max-rollbacks", "2", "--out", "TMP/run"], ["--max-rollbacks applies to --on-diverge rollback"]),
    (["train", "--whiten", "--normalize", "--out", "TMP/run"], ["--whiten replaces --normalize"]),
    (["study", "lre"], ["unknown study 'lre'", "did you mean 'lr'"]),
    (["study", "lr", "--budget", "huge"], ["--budget", "invalid choice: 'huge'"]),
    (["study", "lr", "--seeds", "0"], ["--seeds", "expected an integer in [1, 1000]"]),
    (["study", "lr", "--on-diverge", "retry"], ["--on-diverge", "invalid choice: 'retry'"]),
    (["study", "lr", "--device", "tpu", "--out", "TMP/study"], ["unknown device 'tpu'"]),
    (["study", "lr", "--report-only", "--out", "TMP/study"], ["no finished runs of study 'lr'"]),
    (["tune", "--trials", "0"], ["--trials", "expected an integer in [1, 100,000]"]),
    (["tune", "--workers", "x"], ["--workers", "'x'"]),
    (["tune", "--space", "lr=1..0", "--out", "TMP/tune"], ["--space 'lr=1..0'"]),
    (["tune", "--space", "momentum=2", "--out", "TMP/tune"], ["--space 'momentum=2'", "momentum must be in [0, 1)"]),
    (["tune", "--space", "depth=3", "--out", "TMP/tune"], ["unknown setting 'depth'"]),
    (["tune", "--model", "nin_28", "--out", "TMP/tune"], ["did you mean 'nin28'"]),
    (["tune", "--device", "tpu", "--out", "TMP/tune"], ["unknown device 'tpu'"]),
    (["tune", "--storage", "nodb://x", "--out", "TMP/tune"], ["--storage nodb://x: cannot open it"]),
    (["predict", "TMP/none", "x.png"], ["TMP/none", "no such file"]),
    (["predict", "TMP/none", "x.png", "--top-k", "0"], ["--top-k", "expected an integer in [1, 100,000]"]),
    (["predict", "TMP/none"], ["the following arguments are required: IMAGE"]),
    (["evaluate", "TMP/none", "--batch-size", "0"], ["--batch-size", "expected an integer in [1, 2**20]"]),
    (["evaluate", "TMP"], ["no checkpoint found"]),
    (["cam", "TMP/none"], ["give IMAGE files or --grid N"]),
    (["cam", "TMP/none", "x.png", "--grid", "2"], ["not both"]),
    (["cam", "TMP/none", "--grid", "2", "--top-k", "2"], ["--top-k is for IMAGE files"]),
    (["cam", "TMP/none", "x.png", "--data-dir", "TMP"], ["--data-dir is where --grid finds"]),
    (["cam", "TMP/none", "x.png", "--out", "TMP/cam.jpg"], ["--out must be a .png file"]),
    (["export", "TMP/none", "--format", "keras"], ["--format", "invalid choice: 'keras'"]),
    (["export", "TMP/none", "--tolerance", "0"], ["--tolerance", "expected a number in (0, 1]"]),
    (["export", "TMP/none", "--tolerance", "nan"], ["--tolerance", "'nan'"]),
    (["bench", "--model", "nin_28"], ["did you mean 'nin28'"]),
    (["bench", "--block-seconds", "0"], ["--block-seconds", "expected a number in (0, 3600]"]),
    (["bench", "--repeats", "0"], ["--repeats", "expected an integer in [1, 1000]"]),
    (["bench", "--data", "imagenet"], ["--data", "invalid choice"]),
    (["bench", "--ablate", "bogus"], ["unknown switch(es) to ablate: bogus"]),
    (["bench", "--baseline", "--time-to-accuracy"], ["--baseline is for the speed benchmark"]),
    (["bench", "--targets", "0.5"], ["--targets is for --time-to-accuracy"]),
    (["bench", "--time-to-accuracy", "--targets", "0,2"], ["--targets must be accuracies in (0, 1]"]),
    (["bench", "--time-to-accuracy", "--preset", "turbo"], ["unknown preset 'turbo'"]),
    ([], ["the following arguments are required: COMMAND"]),
]


@pytest.mark.parametrize("argv,needles", FLAGS, ids=[" ".join(a)[:60] for a, _ in FLAGS])
def test_a_bad_flag_is_one_line_and_writes_nothing(capsys, tmp_path, images, argv, needles):
    (tmp_path / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = run(capsys, *expand(argv, TMP=tmp_path, IMAGES=images))
    assert_error(code, out, err, *expand(needles, TMP=tmp_path))
    assert snapshot(tmp_path) == before  # no run, study or tune folder left behind, nothing changed


# A setting that only the data can refute: the run folder made for it, and its parents, are removed again.
DATA_FLAGS = [
    (["--subset", "999"], ["--subset must be between 1 and 18"]),
    (["--holdout", "999"], ["--holdout must be between 1 and 17"]),
    (["--num-classes", "5"], ["set to 5 classes", "has 3"]),
    (["--model", "nin_d2l", "--resize", "8"], ["8x8 is too small"]),
    (["--test-fraction", "1.5"], ["--test-fraction", "expected a number in (0, 1)"]),
]


@pytest.mark.parametrize("argv,needles", DATA_FLAGS, ids=[" ".join(a) for a, _ in DATA_FLAGS])
def test_a_setting_the_data_refutes_leaves_no_run_folder(capsys, tmp_path, images, argv, needles):
    code, out, err = run(capsys, "train", "--dataset", f"folder:{images}", *argv, "--max-steps", "1",
                         "--out", tmp_path / "a" / "b" / "run", "--quiet")
    assert_error(code, out, err, *needles)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_model_for_other_channels_than_the_data_is_one_line(capsys, tmp_path, fashion_mnist):
    code, out, err = run(capsys, "train", "--in-channels", "3", "--subset", "64", "--test-subset", "32",
                         "--out", tmp_path / "run", "--quiet")
    assert_error(code, out, err, "nin28 expects 3-channel input", "fashion-mnist has 1 channel")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- config files

CONFIGS = [
    ("missing.yaml", None, ["missing.yaml", "no such file or directory"]),
    ("bad.yaml", "train:\n  lr: [1\n", ["bad.yaml", "not valid YAML"]),
    ("bad.json", '{"train": {"lr": 0.1,}}', ["bad.json", "not valid JSON"]),
    ("bad.toml", "lr = \n", ["bad.toml", "not valid TOML"]),
    ("list.json", "[1, 2]", ["list.json", "expected a table of settings"]),
    ("unknown.json", '{"trian": {}}', ["unknown RunConfig setting(s): trian"]),
    ("unknown.toml", "[train]\nlearning_rate = 0.1\n", ["unknown train setting(s): learning_rate"]),
    ("type.yaml", "train:\n  lr: fast\n", ["train.lr must be float, got 'fast'"]),
    ("bool.json", '{"train": {"epochs": true}}', ["train.epochs must be int, got True"]),
    ("null.json", '{"train": {"batch_size": null}}', ["train.batch_size must be int, got None"]),
    ("options.json", '{"model": {"options": [1]}}', ["model.options must be dict"]),
    ("preset.toml", 'preset = "turbo"\n', ["unknown preset 'turbo'"]),
    ("config.ini", "[train]\n", ["unknown config format '.ini'"]),
    ("binary.json", b"\xff\xfe\x00", ["binary.json", "not UTF-8 text"]),
]


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("name,content,needles", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_bad_config_file_is_one_line(capsys, tmp_path, command, name, content, needles):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, command, "--config", path, "--out", tmp_path / "out")
    assert_error(code, out, err, *needles)
    assert snapshot(tmp_path) == before


def test_a_config_file_with_an_unknown_model_option_is_one_line(capsys, tmp_path, images):
    path = tmp_path / "opt.yaml"
    path.write_text(f"model:\n  options:\n    depth: 3\ndata:\n  dataset: folder:{images}\n")
    code, out, err = run(capsys, "train", "--config", path, "--out", tmp_path / "out", "--quiet")
    assert_error(code, out, err, "nin28 does not take the option(s) depth")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- mismatched input shapes


@pytest.mark.slow
def test_images_of_any_channels_and_size_are_converted_for_predict_and_cam(capsys, tmp_path, trained, pictures):
    files = [pictures["rgb"], pictures["tiny"], pictures["rgba"]]
    code, out, err = run(capsys, "predict", trained, *files, "--json", "--device", "cpu")
    assert code == 0 and err == "", err
    assert [p["file"] for p in json.loads(out)["predictions"]] == [str(f) for f in files]
    code, out, err = run(capsys, "cam", trained, *files, "--out", tmp_path / "cam.png", "--device", "cpu")
    assert code == 0 and err == "", err
    assert (tmp_path / "cam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change", ["renamed", "added"])
@pytest.mark.parametrize("command", ["evaluate", "cam"])
def test_evaluating_on_a_folder_whose_classes_changed_is_one_line(capsys, tmp_path, trained, change, command):
    import shutil

    config = json.loads((trained / "config.json").read_text())
    root = Path(config["config"]["data"]["dataset"].removeprefix("folder:"))
    moved = tmp_path / "images"
    shutil.copytree(root, moved)
    run_copy = tmp_path / "run"
    shutil.copytree(trained, run_copy)
    for meta in (run_copy / "checkpoints").glob("*/meta.json"):  # the copied run reads the copied folder
        meta.write_text(meta.read_text().replace(str(root), str(moved)))
    if change == "renamed":
        (moved / "c2").rename(moved / "c9")
    else:
        shutil.copytree(moved / "c2", moved / "c3")
    before = snapshot(run_copy)
    argv = ["evaluate", run_copy, "--out", tmp_path / "eval"] if command == "evaluate" else \
        ["cam", run_copy, "--grid", "4", "--out", tmp_path / "cam.png"]
    code, out, err = run(capsys, *argv, "--device", "cpu")
    assert_error(code, out, err, str(moved), "the model was trained on c0, c1, c2")
    assert snapshot(run_copy) == before
    assert not (tmp_path / "eval").exists() and not (tmp_path / "cam.png").exists()


# ---------------------------------------------------------------------- an output folder that cannot be written

UNWRITABLE = [
    (["train", "--dataset", "folder:IMAGES", "--out", "BLOCK/run"], ["BLOCK/run", "cannot write"]),
    (["study", "lr", "--out", "BLOCK/study"], ["BLOCK/study", "cannot write", "not a folder"]),
    (["tune", "--out", "BLOCK/tune"], ["BLOCK/tune", "cannot write", "not a directory"]),
    (["evaluate", "RUN", "--out", "BLOCK/eval", "--device", "cpu"], ["BLOCK/eval/", "cannot write", "not a folder"]),
    (["cam", "RUN", "PIC", "--out", "BLOCK/cam.png", "--device", "cpu"],
     ["BLOCK/cam.png", "cannot write", "not a folder"]),
    (["cam", "RUN", "PIC", "--out", "TMP/is-a-folder.png", "--device", "cpu"],
     ["TMP/is-a-folder.png", "cannot write", "is a directory"]),
    (["export", "RUN", "--format", "torchscript", "--out", "BLOCK/model.pt"],
     ["BLOCK/model.pt", "cannot write", "not a folder"]),
    (["export", "RUN", "--format", "onnx", "--out", "BLOCK/sub/model.onnx"],
     ["BLOCK/sub/model.onnx", "cannot write", "not a folder"]),
]


@pytest.mark.parametrize("argv,needles", UNWRITABLE, ids=["train", "study", "tune", "evaluate", "cam",
                                                           "cam-onto-a-folder", "export-torchscript", "export-onnx"])
def test_an_output_that_cannot_be_written_is_one_line(capsys, tmp_path, blocker, images, trained, pictures, argv,
                                                      needles):
    (tmp_path / "is-a-folder.png").mkdir()
    (tmp_path / "is-a-folder.png" / "mine.txt").write_text("mine")
    before = snapshot(tmp_path, trained)
    paths = dict(BLOCK=blocker, TMP=tmp_path, RUN=trained, PIC=pictures["rgb"], IMAGES=images)
    code, out, err = run(capsys, *expand(argv, **paths))
    assert_error(code, out, err, *expand(needles, **paths))
    assert snapshot(tmp_path, trained) == before


# ---------------------------------------------------------------------- a full disk


@pytest.fixture
def old_outputs(tmp_path) -> Path:
    """An output folder holding the files an earlier evaluate or cam saved there."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("confusion.png", "cam.png"):
        (out / name).write_bytes(b"\x89PNG\r\n\x1a\n an earlier picture")
    (out / "evaluation.json").write_text('{"test_acc": 0.5}')
    return out


FULL = [
    ("evaluate: the JSON", ["evaluate", "RUN", "--out", "OUT", "--force"], "fsync", ["evaluation.json"],
     "OUT/evaluation.json"),
    ("evaluate: the figure", ["evaluate", "RUN", "--out", "OUT", "--force"], "savefig", [], "OUT/confusion.png"),
    ("evaluate: new folder", ["evaluate", "RUN", "--out", "OUT/new/eval"], "fsync", ["evaluation.json"],
     "OUT/new/eval/evaluation.json"),
    ("cam: flushing", ["cam", "RUN", "PIC", "--out", "OUT/cam.png", "--force"], "fsync", ["cam.png"], "OUT/cam.png"),
    ("cam: writing", ["cam", "RUN", "PIC", "--out", "OUT/cam.png", "--force"], "savefig", [], "OUT/cam.png"),
    ("cam: grid", ["cam", "RUN", "--grid", "3", "--out", "OUT/cam.png", "--force"], "savefig", [], "OUT/cam.png"),
    ("export: the model", ["export", "RUN", "--format", "torchscript", "--out", "OUT/m.pt", "--tolerance", "0.01"],
     "fsync", ["m.pt"], "OUT/m.pt"),
    ("export: its sidecar", ["export", "RUN", "--format", "torchscript", "--out", "OUT/m.pt", "--tolerance", "0.01"],
     "fsync", ["m.pt.json"], "OUT/m.pt.json"),
]


@pytest.mark.parametrize("argv,how,names,named", [c[1:] for c in FULL], ids=[c[0] for c in FULL])
def test_a_full_disk_is_one_line_and_leaves_no_half_file(capsys, monkeypatch, trained, pictures, old_outputs, argv,
                                                         how, names, named):
    before = snapshot(old_outputs, trained)
    fail_fsync(monkeypatch, *names) if how == "fsync" else fail_savefig(monkeypatch)
    paths = dict(OUT=old_outputs, RUN=trained, PIC=pictures["rgb"])
    code, out, err = run(capsys, *expand(argv, **paths), *([] if argv[0] == "export" else ["--device", "cpu"]))
    assert_error(code, out, err, f"{expand([named], **paths)[0]}: cannot write: no space left on device")
    assert snapshot(old_outputs, trained) == before  # old files as they were, no temporary or new file, no folder


def test_evaluate_replaces_both_of_its_files_or_neither(capsys, monkeypatch, trained, old_outputs):
    fail_fsync(monkeypatch, "evaluation.json")  # the figure is written whole, but the JSON cannot be
    code, out, err = run(capsys, "evaluate", trained, "--out", old_outputs, "--device", "cpu", "--force")
    assert code == 2
    assert (old_outputs / "confusion.png").read_bytes() == b"\x89PNG\r\n\x1a\n an earlier picture"
    monkeypatch.undo()
    # then both, anew
    assert run(capsys, "evaluate", trained, "--out", old_outputs, "--device", "cpu", "--force")[0] == 0
    assert json.loads((old_outputs / "evaluation.json").read_text())["examples"] == 6
    assert (old_outputs / "confusion.png").read_bytes() != b"\x89PNG\r\n\x1a\n an earlier picture"


def fake_study(out: Path) -> None:
    """Recorded runs of study lr (one seed each) in ``out``, as a finished study leaves them."""
    from nin.experiments.study import STUDIES, StudyConfig, variant_config

    study = STUDIES["lr"]
    lines = []
    for i, v in enumerate(study.budgets["cpu"].variants):
        cfg = variant_config(study, StudyConfig(), v, 0)
        lines.append(json.dumps({
            "study": "lr", "version": study.version, "budget": "cpu", "variant": v.label, "value": v.value,
            "seed": 0, "params": 1000, "macs": 10_000, "run_dir": f"runs/{i}", "status": "ok", "rollbacks": [],
            "history": [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.4 + i / 20}],
            "seconds": 1.0, "config": cfg.to_dict(), "env": {"torch": torch.__version__, "device": "cpu"}}))
    out.mkdir()
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("how,names,named", [
    ("fsync", ["study.json"], "study.json"),
    ("fsync", ["report.md"], "report.md"),
    ("fsync", ["lr0.05.json"], "configs/lr0.05.json"),
    ("savefig", [], "curves.png"),
])
def test_a_full_disk_while_reporting_a_study_keeps_the_old_report(capsys, monkeypatch, tmp_path, how, names, named):
    out = tmp_path / "study"
    fake_study(out)
    assert run(capsys, "study", "lr", "--report-only", "--out", out)[0] == 0
    before = snapshot(out)
    fail_fsync(monkeypatch, *names) if how == "fsync" else fail_savefig(monkeypatch)
    code, stdout, err = run(capsys, "study", "lr", "--report-only", "--out", out)
    assert_error(code, stdout, err, f"{out / named}: cannot write: no space left on device")
    after = snapshot(out)
    assert after.keys() == before.keys()  # no temporary or new file
    assert after[str(out / named)] == before[str(out / named)]  # the file that could not be written is the old one
    assert after[str(out / "results.jsonl")] == before[str(out / "results.jsonl")]  # the recorded runs, untouched
    assert json.loads((out / "study.json").read_text())["study"] == "lr"  # each file whole, old or new
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))


def test_a_full_disk_while_recording_a_studys_run_keeps_whole_lines(monkeypatch, tmp_path):
    from nin.experiments.study import _append, load_records

    path = tmp_path / "results.jsonl"
    path.write_text('{"seed": 0}\n{"seed": 1, "torn')  # a line torn by an earlier crash
    real = os.write

    def write(fd, data):  # half the record reaches the disk, then it is full
        real(fd, bytes(data[: len(data) // 2]))
        raise full_disk()

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(NinError, match=f"{path}: cannot write: no space left on device") as e:
        _append(path, {"seed": 2})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert path.read_text() == '{"seed": 0}\n{"seed": 1, "torn'  # cut back to where it was
    monkeypatch.undo()
    _append(path, {"seed": 3})
    assert load_records(tmp_path) == [{"seed": 0}, {"seed": 3}]  # not glued to the torn line


@pytest.mark.slow
def test_a_full_disk_when_tune_writes_best_yaml_keeps_the_trials(capsys, monkeypatch, tmp_path, images):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "tune"
    fail_fsync(monkeypatch, "best.yaml")
    code, stdout, err = run(capsys, "tune", "--dataset", f"folder:{images}", "--trials", "1", "--max-epochs", "1",
                            "--holdout", "4", "--threads", "1", "--out", out, "--quiet")
    assert_error(code, stdout, err, f"{out / 'best.yaml'}: cannot write: no space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["trials", "tune.db"]  # never lose a finished trial
    study = optuna.load_study(study_name="nin-tune", storage=f"sqlite:///{out / 'tune.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.slow
def test_a_full_disk_behind_stdout_is_one_line_without_a_traceback(trained, pictures):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "nin", "predict", str(trained), str(pictures["rgb"]), "--json",
                            "--device", "cpu"], stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr.splitlines() == ["nin: error: standard output: No space left on device"]


@pytest.mark.slow
def test_a_bad_flag_in_a_real_terminal_is_one_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    p = subprocess.run([sys.executable, "-m", "nin", "study", "lr", "--out", str(blocker / "study")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"nin: error: {blocker / 'study'}: cannot write: {blocker} is a file, "
                                     "not a folder"]


# ---------------------------------------------------------------------- the safety net in main


def test_an_unexpected_os_error_is_one_line_with_exit_status_1(capsys, monkeypatch):
    from nin.cli import main as cli

    def read_only(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x/metrics.csv")

    monkeypatch.setitem(cli.COMMANDS, "models", read_only)
    code, out, err = run(capsys, "models")
    assert_error(code, out, err, status=1)
    assert err == "nin: error: /runs/x/metrics.csv: Read-only file system\n"


def test_running_out_of_memory_is_one_line_with_exit_status_1(capsys, monkeypatch):
    from nin.models import registry

    def huge(**kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 576000000000 bytes. Error code 12 (Cannot allocate memory)")

    entry = registry.MODELS.get("nin28")
    monkeypatch.setitem(registry.MODELS._entries, "nin28", dataclasses.replace(entry, factory=huge))
    code, out, err = run(capsys, "shapes", "nin28", "--width", "8")
    assert_error(code, out, err, "out of memory: tried to allocate 536.4 GiB", status=1)


@pytest.mark.parametrize("bug", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug")])
def test_a_programming_error_keeps_its_traceback(monkeypatch, bug):
    from nin.cli import main as cli

    def broken(args):
        raise bug

    monkeypatch.setitem(cli.COMMANDS, "models", broken)
    with pytest.raises(type(bug)):
        main(["models"])


def test_a_write_error_is_a_nin_error_and_an_os_error(tmp_path):
    from nin.atomic import write_text

    (tmp_path / "afile").write_text("")
    with pytest.raises(WriteError) as e:
        write_text(tmp_path / "afile" / "x.txt", "x")
    assert isinstance(e.value, NinError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOTDIR
    assert str(e.value) == f"{tmp_path / 'afile' / 'x.txt'}: cannot write: {tmp_path / 'afile'} is a file, not a folder"


# ---------------------------------------------------------------------- a data file changed under a cache


def rewrite_keeping_size_and_mtime(path: Path, new: bytes) -> None:
    """Replace the content with ``new`` (the same length) and set the modification time back, as a copy that
    keeps times (cp -p, rsync -t, tar) would."""
    st = path.stat()
    assert len(new) == st.st_size
    path.write_bytes(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_folder_image_rewritten_with_its_size_and_mtime_kept_is_decoded_again(tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"
    first = folder.load_image_folder(root, channels=1, size=(12, 12), cache_dir=cache)
    target = sorted((root / "c1").iterdir())[0]
    buf = io.BytesIO()
    Image.new("L", (12, 12), 255).save(buf, "PNG")  # all white: a few dozen bytes, padded to the old length
    rewrite_keeping_size_and_mtime(target, buf.getvalue().ljust(target.stat().st_size, b"\0"))
    again = folder.load_image_folder(root, channels=1, size=(12, 12), cache_dir=cache)
    assert again.files == first.files
    i = first.files.index(f"c1/{target.name}")
    assert not torch.equal(again.images[i], first.images[i])  # the stale cache was not used
    assert bool((again.images[i] == 255).all())  # the new content was decoded


def test_a_truncated_folder_image_is_one_line_and_not_served_from_the_cache(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    argv = ["train", "--dataset", f"folder:{root}", "--max-steps", "1", "--batch-size", "8", "--threads", "1",
            "--quiet"]
    assert run(capsys, *argv, "--out", tmp_path / "run1")[0] == 0
    target = sorted((root / "c0").iterdir())[0]
    target.write_bytes(target.read_bytes()[:40])
    code, out, err = run(capsys, *argv, "--out", tmp_path / "run2")
    assert_error(code, out, err, str(target), "--skip-bad-images")
    assert not (tmp_path / "run2").exists()


@pytest.fixture
def c10(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    make_cifar_archive(d / cifar.CIFAR10.archive, cifar.CIFAR10, {"train": 20, "test": 10})
    return d


def test_a_cifar_archive_rewritten_with_its_size_and_mtime_kept_is_read_again(tmp_path):
    import gzip

    def stored(seed: int) -> bytes:  # gzip without compression: archives of the same counts have the same size
        make_cifar_archive(tmp_path / "made.tar.gz", cifar.CIFAR10, {"train": 20, "test": 10}, seed=seed)
        return gzip.compress(gzip.decompress((tmp_path / "made.tar.gz").read_bytes()), compresslevel=0, mtime=0)

    d = tmp_path / "data"
    d.mkdir()
    archive = d / cifar.CIFAR10.archive
    archive.write_bytes(stored(0))
    first = cifar.load("cifar10", "test", d, download=False, verify=False)
    rewrite_keeping_size_and_mtime(archive, stored(1))
    again = cifar.load("cifar10", "test", d, download=False, verify=False)
    assert not torch.equal(again.images, first.images)  # the new archive, not the stale cache


def test_a_truncated_cifar_archive_is_not_served_from_the_cache(c10):
    first = cifar.load("cifar10", "test", c10, download=False, verify=False)
    assert len(first.images) == 10
    archive = c10 / cifar.CIFAR10.archive
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(data.DataError, match=re.escape(str(archive))):
        cifar.load("cifar10", "test", c10, download=False, verify=False)


def test_a_corrupt_cifar_cache_is_rebuilt(c10, monkeypatch):
    first = cifar.load("cifar10", "test", c10, download=False, verify=False)
    (cached,) = cifar.cache_dir("cifar10").glob("test-*.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])
    assert torch.equal(cifar.load("cifar10", "test", c10, download=False, verify=False).images, first.images)
    assert cached.stat().st_size > 1000  # rewritten whole
    monkeypatch.setattr(cifar, "read_archive", lambda *a: pytest.fail("decoded again: the rebuilt cache is unused"))
    assert torch.equal(cifar.load("cifar10", "test", c10, download=False, verify=False).images, first.images)


@pytest.fixture
def idx_copy(tmp_path, fashion_mnist) -> Path:
    """Fashion-MNIST's test files, copied where they can be changed, and its training files linked (a named
    data directory is the only place looked)."""
    import shutil

    d = tmp_path / "fmnist"
    d.mkdir()
    found = sources.find_files("fashion-mnist", download=False)
    for name, src in found.items():
        if name.startswith("t10k"):
            shutil.copy2(src, d / src.name)
        else:
            (d / src.name).symlink_to(src)
    return d


@pytest.mark.slow
def test_a_changed_idx_file_is_one_line_not_old_data(capsys, idx_copy, tmp_path):
    """IDX files have no cache: each run reads and checks them again."""
    first = sources.load("fashion-mnist", "test", idx_copy, download=False)
    labels = next(idx_copy.glob("t10k-labels*"))
    raw = bytearray(labels.read_bytes())
    raw[-20] ^= 0xFF  # same size, one byte different, mtime set back
    rewrite_keeping_size_and_mtime(labels, bytes(raw))
    with pytest.raises(data.DataError, match=re.escape(str(labels))):
        sources.load("fashion-mnist", "test", idx_copy, download=False)
    images = next(idx_copy.glob("t10k-images*"))
    images.write_bytes(images.read_bytes()[:-1000])  # truncated
    code, out, err = run(capsys, "train", "--data-dir", idx_copy, "--no-checksum", "--subset", "64",
                         "--out", tmp_path / "run", "--quiet")
    assert_error(code, out, err, str(images))
    assert not (tmp_path / "run").exists()
    assert len(first.images) == 10000


def test_an_unknown_model_name_of_another_type_is_a_nin_error():
    # a name read from a file may be any JSON value (found by tests/test_fuzz.py's meta.json edits)
    from nin.errors import NinError
    from nin.models.registry import MODELS

    with pytest.raises(NinError, match="unknown model 5"):
        MODELS.get(5)
