"""The `nin` command: output, smoke runs on real data, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nin.cli.main import main
from nin.training.config import preset

SEED_TABLE = [
    ("block1", "Sequential", "96x54x54"), ("pool1", "MaxPool2d", "96x26x26"),
    ("block2", "Sequential", "256x26x26"), ("pool2", "MaxPool2d", "256x12x12"),
    ("block3", "Sequential", "384x12x12"), ("pool3", "MaxPool2d", "384x5x5"),
    ("drop1", "Dropout", "384x5x5"), ("block4", "Sequential", "10x5x5"),
    ("gap", "AdaptiveAvgPool2d", "10x1x1"), ("flatten", "Flatten", "10"),
]
SMOKE = ["--subset", "512", "--test-subset", "500", "--epochs", "1", "--batch-size", "64", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nin: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------- inspect


@pytest.mark.slow
def test_models_lists_the_registry(capsys):
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["nin_d2l"]["params"] == 1_992_166 and rows["nin_d2l"]["input"] == "1x224x224"
    assert rows["nin_cifar10"]["params"] == 966_986
    assert rows["nin28"]["default"] is True
    assert rows["lenet"]["family"] == "classic" and rows["nin_d2l"]["family"] == "nin"
    assert "head_width" in rows["nin_d2l"]["options"] and "dropout" not in rows["lenet"]["options"]


def test_shapes_matches_the_seed_table(capsys):
    code, out, _ = run(capsys, "shapes", "nin_d2l")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert [(r[0], r[1], r[2]) for r in rows] == SEED_TABLE
    assert out.splitlines()[-1].split() == ["total", "1,992,166"]


def test_shapes_takes_an_input_size_and_model_options(capsys):
    code, out, _ = run(capsys, "shapes", "nin_d2l", "--input", "3x96x96", "--in-channels", "3", "--mlp-layers", "1")
    assert code == 0 and "input 3x96x96" in out
    assert out.splitlines()[2].split()[2] == "96x22x22"


def test_profile_prints_layers_totals_and_measured_memory_side_by_side(capsys):
    code, out, _ = run(capsys, "profile", "nin28", "--batch", "4")
    assert code == 0
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1] == "79,898"
    assert "1 MAC = 2 FLOPs" in out and "first fully connected layer: none" in out
    for what in ("inference (peak)", "training (peak)"):
        row = next(line for line in out.splitlines() if line.startswith(what)).split()
        assert row[-1].endswith("%") and row[-2] == "MiB" and row[-4] == "MiB"  # estimate, measured, difference
        assert abs(float(row[-1].rstrip("%"))) < 15


def test_profile_json_is_complete_and_adds_up(capsys):
    code, out, _ = run(capsys, "profile", "nin28", "--batch", "4", "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["model"] == "nin28" and d["input_size"] == [1, 28, 28] and d["batch"] == 4
    assert d["params"] == sum(layer["params"] for layer in d["layers"]) == 79_898
    assert d["macs"] == sum(layer["macs"] for layer in d["layers"]) and d["flops"] == 2 * d["macs"]
    for what in ("training", "inference"):
        assert sum(d[what]["parts"].values()) == d[what]["peak"]
        assert abs(d[what]["peak"] / d["measured"][what] - 1) < 0.15


def test_profile_takes_model_options_and_an_input_size(capsys):
    code, out, _ = run(capsys, "profile", "nin_d2l:head_width=384", "--input", "96x96", "--no-measure",
                       "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["input_size"] == [1, 96, 96] and not d.get("measured")
    assert d["params"] == 3_436_554  # block4: 384 -> 384 -> 384 -> 10 instead of 384 -> 10 -> 10 -> 10


def test_profile_compare_puts_models_side_by_side(capsys):
    code, out, _ = run(capsys, "profile", "--compare", "nin28", "lenet", "--no-measure", "--format", "markdown")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    assert code == 0 and rows[0][0] == "model" and [r[0] for r in rows[2:]] == ["nin28", "lenet"]
    assert rows[2][2:5] == ["79,898", "0.3", "none"] and rows[3][2:5] == ["61,706", "0.2", "48,120"]
    code, out, _ = run(capsys, "profile", "--compare", "nin28", "nin28:mlp_layers=1", "--no-measure", "--format",
                       "json")
    assert [d["label"] for d in json.loads(out)] == ["nin28", "nin28:mlp_layers=1"]


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["shapes", "nin_d2"], ["unknown model 'nin_d2'", "nin_d2l"]),
        (["shapes", "nin_d2l", "--input", "1x224"], []),
        (["shapes", "nin_d2l", "--input", "axbxc"], ["--input"]),
        (["shapes", "nin_d2l", "--input", "1x20x20"], ["too small"]),
        (["shapes", "nin28", "--input", "3x28x28"], ["--in-channels 3"]),
        (["shapes", "nin28", "--mlp-layers", "5"], ["--mlp-layers"]),
        (["shapes", "nin28", "--width", "-1"], ["width"]),
        (["train", "--lr", "abc"], ["--lr", "abc"]),
        (["train", "--epochs", "0"], ["--epochs"]),
        (["train", "--schedule", "linear"], ["--schedule"]),
        (["train", "--preset", "turbo"], ["unknown preset 'turbo'"]),
        (["train", "--model", "resnet50"], ["unknown model 'resnet50'"]),
        (["train", "--momentum", "1.5"], ["momentum"]),
        (["train", "--dataset", "imagenet"], ["unknown dataset"]),
        (["train", "--device", "tpu"], ["device"]),
        (["evaluate", "/no/such/run"], ["/no/such/run", "no such file"]),
        (["profile"], ["name a MODEL"]),
        (["profile", "nin_d2"], ["unknown model 'nin_d2'", "nin_d2l"]),
        (["profile", "nin28:width"], ["NAME:key=value"]),
        (["profile", "nin28:width=wide"], ["'wide'"]),
        (["profile", "nin28:depth=3", "--no-measure"], ["depth"]),
        (["profile", "lenet:dropout=0.1", "--no-measure"], ["lenet", "dropout"]),
        (["profile", "--compare", "nin28", "nope", "--no-measure"], ["unknown model 'nope'"]),
        (["profile", "nin28", "--input", "3x28x28"], ["--in-channels 3"]),
        (["profile", "lenet", "--input", "1x4x4", "--no-measure"], ["too small"]),
        (["profile", "nin28", "--batch", "0"], ["--batch"]),
        (["profile", "nin28", "--format", "csv"], ["--format"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, needles):
    code, _, err = run(capsys, *[a.replace("TMP", str(tmp_path)) for a in argv])
    assert_one_line_error(code, err, *needles)


def test_missing_data_offline_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()  # a named directory must exist (tests/test_hostile_data.py: one that does not)
    code, _, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--no-download",
                       "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "--data-dir", "http")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_user_error(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "CUDA is not available")


@pytest.mark.slow
def test_errors_from_a_subprocess_have_no_traceback():
    p = subprocess.run([sys.executable, "-m", "nin", "train", "--batch-size", "-3"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    expected = "nin: error: train: argument --batch-size: expected an integer in [1, 2**20], got '-3'"
    assert p.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_module_entry_point_prints_shapes():
    p = subprocess.run([sys.executable, "-m", "nin", "shapes", "nin_d2l"], capture_output=True, text=True)
    assert p.returncode == 0 and "10x1x1" in p.stdout


# ------------------------------------------------------------ runs on real data


def test_d2l_preset_is_the_seed_recipe():
    cfg = preset("d2l")
    assert cfg.model.name == "nin_d2l" and cfg.model.init == "xavier" and cfg.model.options == {}
    assert cfg.data.resize == 224 and not cfg.data.normalize and cfg.data.crop_padding == 0 and not cfg.data.flip
    t = cfg.train
    assert (t.lr, t.batch_size, t.epochs, t.momentum, t.weight_decay, t.schedule, t.label_smoothing) == (
        0.1, 128, 10, 0.0, 0.0, "constant", 0.0)
    assert not t.nesterov and t.amp == "none"


@pytest.mark.slow
def test_d2l_preset_runs_and_prints_the_seed_summary(capsys, tmp_path, fashion_mnist):
    code, out, err = run(capsys, "train", "--preset", "d2l", "--subset", "64", "--test-subset", "32",
                         "--batch-size", "64", "--epochs", "1", "--out", str(tmp_path / "d2l"), "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    loss_line = next(line for line in lines if line.startswith("loss "))
    assert loss_line.count(",") == 2 and "train acc" in loss_line and "test acc" in loss_line
    speed = lines[lines.index(loss_line) + 1]
    assert speed.endswith("examples/sec on cpu") and float(speed.split()[0]) > 0
    config = json.loads((tmp_path / "d2l" / "config.json").read_text())["config"]
    assert config["model"]["name"] == "nin_d2l" and config["data"]["resize"] == 224


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, fashion_mnist):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SMOKE, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_train_writes_metrics_curves_config_and_a_checkpoint(smoke_run):
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and 0 <= rows[0]["test_acc"] <= 1
    header = (smoke_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_acc", "test_acc", "examples_per_sec", "wall_time", "lr"} <= set(header)
    assert (smoke_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((smoke_run / "config.json").read_text())["env"]["torch"] == torch.__version__
    (ck,) = (smoke_run / "checkpoints").glob("step-*")
    assert ck.name == "step-0000008" and {p.name for p in ck.iterdir()} == {
        "model.safetensors", "state.safetensors", "meta.json"}
    assert (smoke_run / "checkpoints" / "best").resolve() == ck.resolve()  # the only epoch is the best so far


@pytest.mark.slow
def test_evaluate_reports_per_class_accuracy_and_a_confusion_png(capsys, smoke_run, tmp_path):
    code, out, err = run(capsys, "evaluate", str(smoke_run), "--json", "--out", str(tmp_path))
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == 10_000 and len(result["per_class_acc"]) == 10
    cm = torch.tensor(result["confusion"])
    assert cm.sum() == 10_000 and cm.sum(1).tolist() == [1000] * 10  # the real test set: 1,000 per class
    assert result["test_acc"] == pytest.approx(float(cm.diag().sum()) / 10_000)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_an_existing_run_directory_is_never_reused(capsys, smoke_run):
    before = (smoke_run / "metrics.jsonl").read_bytes()
    code, _, err = run(capsys, "train", *SMOKE, "--out", str(smoke_run))
    assert_one_line_error(code, err, "already exists", "--resume")
    assert (smoke_run / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_changed_settings(capsys, smoke_run):
    code, _, err = run(capsys, "train", "--resume", str(smoke_run), "--lr", "0.5")
    assert_one_line_error(code, err, "--lr")


@pytest.mark.slow
def test_stop_early_then_resume_continues_the_run(capsys, tmp_path, fashion_mnist):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", *SMOKE, "--max-steps", "3", "--out", str(out))
    assert code == 0, err
    assert "stopped before the end of the first epoch" in stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]  # no epoch ended: no best
    code, stdout, err = run(capsys, "train", "--resume", str(out), "--epochs", "2", "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best", "step-0000003", "step-0000008", "step-0000016"]


def test_evaluate_a_corrupt_checkpoint_is_one_line(capsys, tmp_path, smoke_run):
    import shutil

    (ck,) = (smoke_run / "checkpoints").glob("step-*")
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run(capsys, "evaluate", str(bad))
    assert_one_line_error(code, err, "model.safetensors")


def test_an_unwritable_run_directory_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, _, err = run(capsys, "train", "--out", str(blocker / "run"))
    assert_one_line_error(code, err, "cannot write the run directory")
    assert blocker.read_text() == "keep me"


@pytest.mark.slow
def test_on_diverge_rollback_logs_each_rollback_then_stops_with_one_line(capsys, tmp_path, fashion_mnist):
    # lr 1000 without BatchNorm: the loss is NaN within a few steps, every time
    run = tmp_path / "run"
    argv = ["train", "--no-batch-norm", "--lr", "1000", "--schedule", "constant", "--subset", "256",
            "--test-subset", "64", "--batch-size", "32", "--epochs", "1", "--threads", "1", "--out", str(run),
            "--quiet", "--on-diverge", "rollback", "--max-rollbacks", "2", "--rollback-factor", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("nin: error:") == 1 and "after 2 rollback(s) (lr scale 0.25)" in err
    assert err.count("diverged: loss nan at step") == 2 and "rolled back to step 0" in err
    log = [json.loads(line) for line in (run / "rollbacks.jsonl").read_text().splitlines()]
    assert [e["lr_scale"] for e in log] == [0.5, 0.25] and all(e["loss"] == "nan" for e in log)
    assert (run / "config.json").exists()  # the run directory and its settings are kept


def test_on_diverge_flags_are_checked(capsys, tmp_path):
    assert main(["train", "--on-diverge", "retry", "--out", str(tmp_path / "r")]) == 2
    assert "invalid choice: 'retry'" in capsys.readouterr().err
    assert main(["train", "--rollback-factor", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rollback-factor: expected a number in (0, 1)" in err
