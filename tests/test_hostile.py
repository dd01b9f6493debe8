"""A hostile user's run directories, checkpoints, flags and outputs: each is one line and exit 2 (1 for the
operating system), never a traceback, never a hang, and a refused command changes no file.

Covered here: a checkpoint's ``meta.json`` checked as a whole against the model it describes (also under
Hypothesis, field by field); special files (FIFOs, devices, symbolic-link loops) in a checkpoint's place;
numeric flags and settings outside their declared ranges; the output rule (never replaced without
``--force``, not even in a race); one process per run directory; a damaged newest checkpoint, an older one
named for a resume, and a run killed before its first checkpoint. The data files' side (gzip bombs, image
pixel caps, named data directories) is in tests/test_hostile_data.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line as assert_one_line
from conftest import image_folder, snapshot, synthetic_images, within
from conftest import run_cli as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.cli.main import build_parser, main
from nin.inference.trained import load_trained
from nin.training import checkpoint as ckpt
from nin.training.run import lock_run_dir


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "train")


def train_args(images: Path, out: Path, *extra) -> list[str]:
    return ["train", "--dataset", f"folder:{images}", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--no-channels-last", "--amp", "none", "--out", str(out), "--quiet", *map(str, extra)]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    """A run of nin28 on a 3-class image folder, two checkpoints (steps 2 and 3): never changed by a test."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        assert main(train_args(images, out, "--checkpoint-every", "2")) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000002", "step-0000003"]
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run this test may damage."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("pic") / "pic.png"
    Image.fromarray(synthetic_images(1, size=12)[0][0, 0].numpy()).save(f)
    return f


def newest(run: Path) -> Path:
    return ckpt.list_checkpoints(run)[-1]


def edit_meta(checkpoint: Path, change) -> None:
    file = checkpoint / "meta.json"
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


# ------------------------------------------------------- meta.json checked against the model it describes


def _set(path: str, value):
    def change(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return change


BAD_META = [
    ("data.classes", ["a", "b", "c", "d"], "data.classes names 4 classes; the model has 3 outputs"),
    ("data.classes", [], "names 0 classes"),
    ("data.classes", ["a", "a", "b"], "names a class twice"),
    ("data.classes", ["a", 1, "b"], "must be a list of class names"),
    ("data.mean", [0.1, 0.2, 0.3], "data.mean has 3 values; the model takes 1 channel"),
    ("data.mean", ["a"], "data.mean must be a list of finite numbers"),
    ("data.std", [0], "data.std must be positive"),
    ("data.std", [-1.0], "data.std must be positive"),
    ("data.size", [0, 0], "data.size is [0, 0]; the model it describes takes 28x28"),
    ("data.size", [-5, 28], "data.size is [-5, 28]"),
    ("data.size", [28, 28, 28], "data.size is [28, 28, 28]"),
    ("data.size", [10**400, 28], "data.size is [1000000"),
    ("data.size", "28x28", "data.size is \"28x28\""),
    ("data.dataset", 7, "data.dataset must be a data set name"),
    ("data.dataset", "nope", "data.dataset is not usable"),
    ("data.whitening", "../../../etc/passwd", "data.whitening must be 'whitening.safetensors' or null"),
    ("model.options", [], "'model': a name and a table of options"),
    ("model.options.input_size", [30000, 30000], "input_size must be two integers (H, W) from 1 to 4096"),
    ("model.options.input_size", [10**400, 28], "input_size must be two integers"),
    ("model.options.width", 1e-9, "width must be in [0.0625, 8]"),
    ("config.seed", 10**30, "seed must be in [0, 4,294,967,295]"),
    ("config.data.crop_padding", 10**9, "crop_padding must be in [0, 64]"),
]


@pytest.mark.parametrize("field, value, says", BAD_META, ids=[f"{f}={str(v)[:20]}" for f, v, _ in BAD_META])
def test_a_meta_json_that_does_not_fit_its_model_is_one_line(run_copy, picture, capsys, field, value, says):
    """The checksums prove meta.json's tensor files intact, not that meta.json makes sense: every field is
    checked against the model it describes, once, when the run is loaded, by predict, evaluate and export."""
    edit_meta(newest(run_copy), _set(field, value))
    before = snapshot(run_copy)
    for argv in (["predict", run_copy, picture, "--device", "cpu"], ["evaluate", run_copy, "--device", "cpu"],
                 ["export", run_copy, "--format", "torchscript"]):
        line = assert_one_line(*run(capsys, *argv), "meta.json", says)
        assert len(line) < 600
    assert snapshot(run_copy) == before


def test_the_run_as_saved_loads(trained):
    t = load_trained(trained, "cpu")
    assert t.classes == ["c0", "c1", "c2"] and t.size == (28, 28) and t.model.num_classes == 3


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
FIELDS = ["data.classes", "data.mean", "data.std", "data.size", "data.dataset", "data.whitening", "model.name",
          "model.options", "model.options.num_classes", "model.options.input_size", "model.options.width",
          "model.options.in_channels", "config.seed", "config.data.resize", "config.train.batch_size"]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES), min_size=1, max_size=3))
def test_any_values_in_meta_json_load_or_are_one_checkpoint_error(trained, tmp_path_factory, changes):
    """Hypothesis over meta.json's fields (not its bytes: tests/test_fuzz.py does those): whatever values they
    hold, the run loads or the load is one CheckpointError, never another exception or a huge allocation."""
    run = Path(shutil.copytree(trained, tmp_path_factory.mktemp("h") / "run", symlinks=True))
    for field, value in changes:
        with contextlib.suppress(KeyError, TypeError):  # a parent replaced by a non-table earlier
            edit_meta(newest(run), _set(field, value))
    try:
        t = load_trained(run, "cpu")
    except ckpt.CheckpointError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
        return
    # loaded: then what it describes is consistent
    assert len(t.classes) == t.model.num_classes and tuple(t.model.input_size[1:]) == t.size
    assert all(s > 0 for s in t.std)


# ------------------------------------------------------------------- special files in a checkpoint's place


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _a_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPECIAL = [("meta.json", _fifo, "meta.json: a FIFO (named pipe), not a regular file"),
           ("model.safetensors", _fifo, "model.safetensors: a FIFO (named pipe), not a regular file"),
           ("meta.json", _dev_zero, "meta.json: a character device, not a regular file"),
           ("model.safetensors", _dev_zero, "model.safetensors: a character device, not a regular file"),
           ("state.safetensors", _a_folder, "state.safetensors: a directory, not a regular file")]


@pytest.mark.parametrize("name, make, says", SPECIAL, ids=[f"{n}-{m.__name__[1:]}" for n, m, _ in SPECIAL])
def test_a_special_file_in_a_checkpoint_is_named_and_never_blocks(run_copy, picture, capsys, name, make, says):
    damaged = newest(run_copy)
    make(damaged / name)
    with within():
        for target in (damaged, run_copy):  # named directly, and as the run's newest checkpoint
            assert_one_line(*run(capsys, "predict", target, picture, "--device", "cpu"), says)
        assert_one_line(*run(capsys, "train", "--resume", run_copy, "--quiet"), says)


def test_a_symlink_loop_for_a_checkpoint_folder_is_named(tmp_path, picture, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for argv in (["predict", tmp_path / "a", picture], ["evaluate", tmp_path / "a"],
                 ["train", "--resume", tmp_path / "a"]):
        assert_one_line(*run(capsys, *argv), str(tmp_path / "a"), "a loop of symbolic links")


def test_a_run_directory_that_is_a_file_or_a_fifo_is_named(tmp_path, picture, capsys):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    with within():
        assert_one_line(*run(capsys, "predict", tmp_path / "file", picture), "a regular file, not a checkpoint")
        assert_one_line(*run(capsys, "evaluate", tmp_path / "fifo"), "a FIFO (named pipe), not a checkpoint")


# ------------------------------------------------------------------------------------ flags and ranges


BAD_FLAGS = [
    (["train", "--seed", str(10**30)], "--seed: expected an integer in [0, 4,294,967,295]"),
    (["train", "--seed", "-1"], "--seed: expected an integer in [0, 4,294,967,295]"),
    (["train", "--crop-padding", str(10**9)], "--crop-padding: expected an integer in [0, 64]"),
    (["train", "--width", "1e-9"], "--width: expected a number in [0.0625, 8]"),
    (["train", "--lr", "1e999"], "--lr: expected a number > 0"),
    (["train", "--lr", "nan"], "--lr: expected a number > 0"),
    (["train", "--resize", str(10**9)], "--resize: expected an integer in [1, 4096]"),
    (["train", "--epochs", "1.5"], "--epochs: expected an integer in [1, 10**6], got '1.5'"),
    (["train", "--threads", str(10**9)], "--threads: expected an integer in [1, 4096]"),
    (["train", "--out", ""], "--out: expected a file or folder name, got an empty one"),
    (["train", "--out", "a\0b"], "--out: a file name cannot hold a NUL byte"),
    (["train", "--data-dir", ""], "--data-dir: expected a file or folder name"),
    (["cam", "RUN", "--grid", str(10**9)], "--grid: expected an integer in [1, 256]"),
    (["predict", "RUN", "x.png", "--top-k", str(10**30)], "--top-k: expected an integer in [1, 100,000]"),
    (["predict", "", "x.png"], "checkpoint: expected a file or folder name"),
    (["shapes", "nin28", "--input", "30000x30000"], "--input must look like CxHxW or HxW"),
    (["shapes", "nin28", "--num-classes", str(10**12)], "--num-classes: expected an integer in [1, 100,000]"),
    (["bench", "--size", str(10**9)], "--size: expected an integer in [1, 4096]"),
    (["bench", "--warmup", str(10**9)], "--warmup: expected an integer in [0, 10,000]"),
    (["tune", "--workers", "100000"], "--workers: expected an integer in [1, 256]"),
    (["study", "lr", "--seeds", str(10**9)], "--seeds: expected an integer in [1, 1000]"),
]


@pytest.mark.parametrize("argv, says", BAD_FLAGS, ids=[" ".join(a)[:40] for a, _ in BAD_FLAGS])
def test_a_flag_outside_its_range_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    assert_one_line(*run(capsys, *argv), says)
    assert list(tmp_path.iterdir()) == []


def _flag_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            yield name, action


def test_every_numeric_flag_has_a_declared_range():
    """A numeric flag added without a range fails here: its type must come from nin.bounds (a range declared
    once, beside the setting), or be a parser that checks its own format and bounds."""
    own = {"parse_input_size", "_fractions", "_path"}
    unchecked = []
    for command, action in _flag_actions():
        t = action.type
        if t is None or action.choices is not None:
            continue
        qualname = getattr(t, "__qualname__", "")
        if not (qualname in own or qualname.startswith(("flag_type.", "_ranged."))):
            unchecked.append(f"nin {command} {'/'.join(action.option_strings) or action.dest}: {qualname}")
    assert unchecked == []
    ranged = sum(getattr(a.type, "__qualname__", "").startswith(("flag_type.", "_ranged.")) for _, a in _flag_actions())
    assert ranged > 50  # the check above looked at the flags


@pytest.mark.parametrize("setting, value, says", [
    ({"seed": 10**30}, None, "seed must be in [0, 4,294,967,295]"),
    ({"data": {"crop_padding": 10**9}}, None, "crop_padding must be in [0, 64]"),
    ({"train": {"warmup": 1.0}}, None, "warmup must be in [0, 1)"),
    ({"train": {"milestones": [0.5, 2.0]}}, None, "milestones[1] must be in (0, 1)"),
    ({"checkpoint": {"keep_last": -1}}, None, "keep_last must be in [0, 10**6]"),
    ({"model": {"options": {"width": 1e-9}}}, None, "width must be in [0.0625, 8]"),
])
def test_a_config_file_is_held_to_the_same_ranges_as_the_flags(tmp_path, capsys, setting, value, says):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(setting))
    assert_one_line(*run(capsys, "train", "--config", cfg, "--out", tmp_path / "run", "--quiet"), says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


# ------------------------------------------------------------------- outputs: never replaced without --force


def test_cam_never_replaces_an_existing_file_without_force(trained, picture, tmp_path, capsys):
    out = tmp_path / "cam.png"
    out.write_bytes(b"mine")
    assert_one_line(*run(capsys, "cam", trained, picture, "--out", out, "--device", "cpu"),
                    str(out), "already exists; pass --force")
    assert out.read_bytes() == b"mine"
    code, said, _ = run(capsys, "cam", trained, picture, "--out", out, "--device", "cpu", "--force")
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_to_replace_its_earlier_files_without_force(run_copy, capsys):
    assert run(capsys, "evaluate", run_copy, "--device", "cpu")[0] == 0
    before = snapshot(run_copy)
    assert_one_line(*run(capsys, "evaluate", run_copy, "--device", "cpu"), "confusion.png", "already exists")
    assert snapshot(run_copy) == before
    assert run(capsys, "evaluate", run_copy, "--device", "cpu", "--force")[0] == 0


def test_a_file_that_appears_while_the_command_works_is_kept(trained, picture, tmp_path, capsys, monkeypatch):
    """The check before the work is not enough: another process may write the file meanwhile. It is kept, and
    the command fails, because the new file is placed with a link that cannot replace one."""
    import nin.plots

    out = tmp_path / "cam.png"
    real = nin.plots.plt.Figure.savefig

    def savefig_then_someone_writes_out(fig, *a, **kw):
        real(fig, *a, **kw)
        out.write_bytes(b"written by someone else")

    monkeypatch.setattr(nin.plots.plt.Figure, "savefig", savefig_then_someone_writes_out)
    assert_one_line(*run(capsys, "cam", trained, picture, "--out", out, "--device", "cpu"), "already exists")
    assert out.read_bytes() == b"written by someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.png"]  # no temporary file left


# ----------------------------------------------------------------------------- one process per run directory


def test_a_run_directory_in_use_is_refused_and_left_alone(images, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with lock_run_dir(out):  # as a `nin train --out run` running in another process holds it
        assert_one_line(*run(capsys, *train_args(images, out)), str(out), "in use by another nin process")
        assert out.is_dir() and list(out.iterdir()) == []  # not removed as a failed command's own folder
    assert run(capsys, *train_args(images, out))[0] == 0  # once it is free


def test_a_run_being_trained_is_not_resumed(run_copy, capsys):
    before = snapshot(run_copy)
    with lock_run_dir(run_copy):
        assert_one_line(*run(capsys, "train", "--resume", run_copy, "--quiet"), "in use by another nin process")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_two_runs_started_together_into_one_directory_one_is_refused(images, tmp_path):
    """Two real processes race for one --out: exactly one trains, the other is refused with one line, and the
    directory holds the winner's settings and checkpoints only."""
    out = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "nin", *train_args(images, out, "--seed", seed)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and ("in use by another nin process" in loser or "already exists" in loser)
    winner_seed = 1 if results[0][0] == 0 else 2
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == winner_seed
    assert all(json.loads((c / "meta.json").read_text())["config"]["seed"] == winner_seed
               for c in ckpt.list_checkpoints(out))


def test_a_checkpoint_another_process_wrote_is_never_taken_for_this_runs(run_copy):
    """The Checkpointer refuses to find its next checkpoint already there (unless it is the one it went on
    from), instead of keeping it silently as this run's."""
    from nin.training.callbacks import Checkpointer

    class At:
        step = 3
        model = torch.nn.Linear(1, 1)

        def state_dict(self):
            return {}

    cp = Checkpointer(run_copy, {}, resumed_from=None)
    with pytest.raises(ckpt.CheckpointError, match="already exists, and is not the checkpoint this run went on"):
        cp.save(At())
    assert Checkpointer(run_copy, {}, resumed_from=newest(run_copy)).save(At()) == newest(run_copy)


# ------------------------------------------------------------ damaged, older and missing checkpoints on resume


def test_a_damaged_newest_checkpoint_is_refused_by_every_command_and_nothing_changes(run_copy, picture, capsys):
    damaged, intact = newest(run_copy), ckpt.list_checkpoints(run_copy)[0]
    (damaged / "state.safetensors").unlink()
    before = snapshot(run_copy)
    for argv in (["predict", run_copy, picture], ["evaluate", run_copy], ["train", "--resume", run_copy, "--quiet"]):
        assert_one_line(*run(capsys, *argv, "--device", "cpu"), f"newest checkpoint is damaged ({damaged}",
                        f"the newest intact one is {intact}")
    assert snapshot(run_copy) == before  # metrics.csv and metrics.jsonl too: history is never rewritten
    assert run(capsys, "predict", intact, picture, "--device", "cpu")[0] == 0  # named, the older one is used


def test_resuming_from_an_older_checkpoint_is_refused(run_copy, capsys):
    older = ckpt.list_checkpoints(run_copy)[0]
    before = snapshot(run_copy)
    assert_one_line(*run(capsys, "train", "--resume", older, "--quiet"), "not the run's newest checkpoint",
                    "step-0000003 is newer")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_can_be_resumed(images, tmp_path, capsys):
    """It left its config.json and a checkpoint's temporary folder: --resume trains it from the start with its
    saved settings (saying so), instead of finding nothing to resume and a folder it may not reuse."""
    out = tmp_path / "run"
    assert run(capsys, *train_args(images, out, "--seed", "5"))[0] == 0
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints" / ".step-0000003.abc123").mkdir(parents=True)  # the save the kill interrupted
    (out / "checkpoints" / ".step-0000003.abc123" / "model.safetensors").write_bytes(b"half")
    assert_one_line(*run(capsys, *train_args(images, out)), "already exists; pass --resume")
    code, said, err = run(capsys, "train", "--resume", out, "--quiet")
    assert code == 0, err
    assert "nin: note:" in err and "has no checkpoint yet" in err and "from the start" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000003"]
    assert not list((out / "checkpoints").glob(".step-*"))
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 5
