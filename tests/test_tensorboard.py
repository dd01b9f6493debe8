"""``nin train --tensorboard``: the event stream (tags, steps, an image per epoch, the settings), a resumed run
that continues it with no point missing or twice, training unchanged by it, and one error line without the
package."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NaNAt, assert_one_error_line, run_cli, synthetic_images
from safetensors.torch import load_file
from torch import nn

from nin.data.loader import DeviceLoader
from nin.errors import NinError
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.callbacks import TensorBoard
from nin.training.callbacks import tensorboard as tb
from nin.training.config import RunConfig, TrainConfig, load_run_config, preset
from nin.training.run import train
from nin.training.trainer import Trainer, lr_at

STEP_TAGS = ["step/loss", "step/lr", "step/running_train_acc", "step/images_per_sec"]
EPOCH_TAGS = ["epoch/train_loss", "epoch/train_acc", "epoch/test_loss", "epoch/test_acc", "epoch/examples_per_sec"]
TIMING = ("step/images_per_sec", "epoch/examples_per_sec")
# 512 images in batches of 64: 8 steps per epoch, 2 epochs, a point every 3 steps (so a checkpoint can fall
# inside a window of losses), at each epoch's end (steps 8 and 16) and at its last step.
EVERY, STEPS = 3, 16


def config(tensorboard: bool = True) -> RunConfig:
    """nin28 with dropout (the global RNG) and translations (the loader's draws), briefly on real images."""
    cfg = preset("default")
    cfg.data.subset, cfg.data.test_subset, cfg.data.crop_padding = 512, 128, 2
    cfg.model.options = {"dropout": 0.1}
    cfg.train.epochs, cfg.train.batch_size, cfg.seed = 2, 64, 3
    cfg.train.tensorboard, cfg.train.tensorboard_every = tensorboard, EVERY
    return cfg


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def points(acc, tags=None) -> dict[str, list[tuple[int, float]]]:
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags or acc.Tags()["scalars"]}


def settings(folder: Path):
    """The hyper-parameters logged in ``folder``/hparams, by name."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events(folder / "hparams").PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return HParamsPluginData.FromString(content).session_start_info.hparams


def next_second() -> None:
    """Event files are named by the second they were opened in: a resumed run's must sort after the last."""
    now = time.time()
    time.sleep(max(0.0, int(now) + 1.01 - now))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist, one_thread) -> dict[str, Path]:
    """The same short run with and without --tensorboard."""
    root = tmp_path_factory.mktemp("tensorboard")
    for name, on in (("with", True), ("without", False)):
        train(config(on), root / name, progress=False)
    return {"with": root / "with", "without": root / "without"}


@pytest.mark.slow
def test_a_run_writes_step_and_epoch_scalars_an_image_per_epoch_and_its_settings(runs):
    run = runs["with"]
    acc = events(run / "tensorboard")
    assert acc.Tags()["scalars"] == STEP_TAGS + EPOCH_TAGS
    got = points(acc)
    for tag in STEP_TAGS:
        assert [s for s, _ in got[tag]] == list(range(EVERY, STEPS + 1, EVERY)), tag
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag in EPOCH_TAGS:
        key = tag.split("/")[1]
        assert got[tag] == [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in history], tag
    lrs = [lr_at(config().train, s - 1, STEPS) for s, _ in got["step/lr"]]  # the lr of each point's last step
    assert [v for _, v in got["step/lr"]] == pytest.approx(lrs, rel=1e-6)
    assert all(v > 0 for _, v in got["step/images_per_sec"]) and all(0 <= v <= 1 for _, v in
                                                                     got["step/running_train_acc"])
    images = acc.Images("cam")
    assert [(i.step, i.width, i.height) for i in images] == [(8, 1152, 600), (16, 1152, 600)]
    assert all(i.encoded_image_string.startswith(b"\x89PNG") for i in images)

    start = settings(run / "tensorboard")
    assert start["model.name"].string_value == "nin28" and start["train.lr"].number_value == 0.2
    assert start["data.subset"].number_value == 512 and start["model.options.dropout"].number_value == 0.1
    assert start["train.milestones"].string_value == "0.5,0.75" and start["train.nesterov"].string_value == "true"
    final = points(events(run / "tensorboard" / "hparams"))
    assert final["hparam/test_acc"] == [(STEPS, pytest.approx(history[-1]["test_acc"], rel=1e-6))]
    assert final["hparam/best_test_acc"] == [(STEPS, pytest.approx(max(h["test_acc"] for h in history)))]
    assert set(final) == {f"hparam/{k}" for k in ("train_loss", "train_acc", "test_loss", "test_acc",
                                                  "best_test_acc")}


@pytest.mark.slow
def test_training_is_the_same_with_and_without_tensorboard(runs):
    """The class maps, the reads and the writes draw no random number and change no weight or statistic."""
    def final(run: Path):
        last = ckpt.list_checkpoints(run)[-1]
        rows = [{k: v for k, v in json.loads(line).items() if k not in ("examples_per_sec", "epoch_time",
                                                                         "wall_time")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
        return last.name, load_file(last / "model.safetensors"), load_file(last / "state.safetensors"), rows

    (na, wa, sa, ha), (nb, wb, sb, hb) = final(runs["with"]), final(runs["without"])
    assert na == nb == f"step-{STEPS:07d}"
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # weights and BN statistics
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # optimizer and RNG
    assert ha == hb
    assert not (runs["without"] / "tensorboard").exists()


@pytest.mark.slow
def test_a_resumed_run_continues_the_stream_with_no_point_missing_or_twice(tmp_path, runs, one_thread):
    """Stopped at step 10 (inside a window of losses), resumed to step 14, where it wrote a point (12) after
    its last checkpoint and lost that checkpoint (as a crash would); resumed again to the end: the stream is
    the uninterrupted run's, point for point."""
    run = tmp_path / "run"
    cfg = config()
    cfg.train.max_steps = 10
    train(cfg, run, progress=False)
    for stop in (14, None):
        next_second()
        train(cfg, resume=run, keep={"epochs": None, "max_steps": stop}, progress=False)
        if stop == 14:
            assert [p.name for p in ckpt.list_checkpoints(run)][-2:] == ["step-0000010", "step-0000014"]
            shutil.rmtree(run / "checkpoints" / "step-0000014")  # resumed from 10: point 12 is written again
    resumed, reference = events(run / "tensorboard"), events(runs["with"] / "tensorboard")
    tags = [t for t in STEP_TAGS + EPOCH_TAGS if t not in TIMING]
    assert points(resumed, tags) == points(reference, tags)  # every value, to the last bit
    assert [s for s, _ in points(resumed, TIMING)["step/images_per_sec"]] == list(range(EVERY, STEPS + 1, EVERY))
    assert [i.step for i in resumed.Images("cam")] == [8, 16]
    assert len(list((run / "tensorboard" / "hparams").glob("events.out.tfevents.*"))) == 1
    assert points(events(run / "tensorboard" / "hparams")) == points(events(runs["with"] / "tensorboard" / "hparams"))


# ------------------------------------------------------------ the trainer alone


def tiny_trainer(callback: TensorBoard, model: nn.Module | None = None, **config) -> Trainer:
    x, y = synthetic_images(256, classes=4, size=12)
    xt, yt = synthetic_images(64, classes=4, size=12, seed=1)
    train_loader = DeviceLoader(x, y, 32, shuffle=True, mean=(0.2,), std=(0.3,))
    test_loader = DeviceLoader(xt, yt, 64, mean=(0.2,), std=(0.3,))
    torch.manual_seed(0)
    model = model or create_model("nin28", num_classes=4, width=0.25)
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": 0.05, "channels_last": False, **config})
    return Trainer(model, cfg, train_loader, test_loader, [callback])


@pytest.mark.slow
def test_a_rollback_hides_the_discarded_points(tmp_path, one_thread):
    """Diverged at step 6 and redone from step 0: the point at step 3 of the first try is hidden, and a model
    without class maps (this wrapper) gets no figure."""
    cb = TensorBoard(tmp_path / "tb", every=3, cam_images=2)
    model = NaNAt(create_model("nin28", num_classes=4, width=0.25), at=6)
    trainer = tiny_trainer(cb, model, on_diverge="rollback")
    trainer.fit()
    assert [e["step"] for e in trainer.rollbacks] == [6]
    acc = events(tmp_path / "tb")
    assert [s for s, _ in points(acc)["step/loss"]] == [3, 6]
    assert acc.Tags()["images"] == []
    assert settings(tmp_path / "tb")["train.on_diverge"].string_value == "rollback"  # no run's: the trainer's


@pytest.mark.slow
def test_only_the_main_process_writes(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(tb, "is_main_process", lambda: False)
    cb = TensorBoard(tmp_path / "tb", every=2)
    tiny_trainer(cb, max_steps=3).fit()
    assert not (tmp_path / "tb").exists() and cb.state_dict() == {}


# ------------------------------------------------------------ settings and errors


def test_settings_flatten_to_numbers_and_text():
    flat = tb.hparams_of(RunConfig().to_dict())
    assert flat["train.lr"] == 0.2 and flat["train.epochs"] == 3 and flat["model.name"] == "nin28"
    assert flat["train.nesterov"] == "true" and flat["train.tensorboard"] == "false"
    assert flat["train.compile"] == "none" and flat["train.milestones"] == "0.5,0.75"
    assert tb.hparams_of({"model": {"options": {"width": 0.5}}}) == {"model.options.width": 0.5}


def test_tensorboard_flags_come_from_the_train_settings():
    from nin.cli.main import build_parser
    from nin.cli.options import settings_given

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    assert settings_given(train_parser.parse_args([])) == {}
    args = train_parser.parse_args(["--tensorboard", "--tensorboard-every", "10"])
    assert settings_given(args) == {"train.tensorboard": True, "train.tensorboard_every": 10}
    assert settings_given(train_parser.parse_args(["--no-tensorboard"])) == {"train.tensorboard": False}
    with pytest.raises(NinError, match="--tensorboard-every"):
        train_parser.parse_args(["--tensorboard-every", "0"])
    assert TrainConfig().tensorboard is False and TrainConfig().tensorboard_every == 50


def test_a_config_json_from_before_the_settings_still_loads(tmp_path):
    doc = RunConfig().to_dict()
    for key in ("tensorboard", "tensorboard_every"):
        del doc["train"][key]
    (tmp_path / "config.json").write_text(json.dumps({"config": doc, "env": {}}))
    cfg = load_run_config(tmp_path)
    assert cfg.train.tensorboard is False and cfg.train.tensorboard_every == 50


def test_tensorboard_every_without_tensorboard_is_one_error_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--tensorboard-every", "5", "--out", tmp_path / "run")
    assert_one_error_line(code, out, err, "--tensorboard-every applies to --tensorboard")
    assert not (tmp_path / "run").exists()


def test_without_the_package_tensorboard_is_one_error_line_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(NinError, match="pip install tensorboard"):
        tb.require_tensorboard()
    code, out, err = run_cli(capsys, "train", "--tensorboard", "--subset", "64", "--out", tmp_path / "run")
    assert_one_error_line(code, out, err, "needs the tensorboard package", "pip install tensorboard")
    assert not (tmp_path / "run").exists()  # nothing was trained, no run directory is left
