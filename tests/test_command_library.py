"""What the commands compute, as library functions (the handlers in nin.cli only parse, call one and print):
``describe_models`` (nin models), ``stage_shapes`` (nin shapes), ``evaluate_trained`` and ``write_evaluation``
(nin evaluate), ``grid_panels`` and ``image_panels`` (nin cam), ``result_lines`` (nin train; nin bench's are in
test_bench.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import synthetic_images
from PIL import Image

from nin.analysis.shapes import stage_shapes
from nin.atomic import OutputExists
from nin.cli.main import main
from nin.errors import NinError
from nin.inference.cam import GRID_COLUMNS, grid_panels, image_panels
from nin.inference.evaluate import evaluate_trained, write_evaluation
from nin.inference.trained import load_trained
from nin.models import DEFAULT_MODEL, create_model, list_models
from nin.models.registry import describe_models
from nin.training.run import result_lines


def test_describe_models_lists_every_registered_model_with_its_real_parameter_count():
    rows = describe_models(DEFAULT_MODEL)
    assert [r["name"] for r in rows] == list_models()
    d2l = next(r for r in rows if r["name"] == "nin_d2l")
    assert d2l["params"] == 1_992_166 and d2l["input"] == "1x224x224" and d2l["family"] == "nin"
    assert [r["name"] for r in rows if r["default"]] == [DEFAULT_MODEL]
    assert "mlp_layers" in d2l["options"]


def test_stage_shapes_are_the_chapters_printout():
    rows = stage_shapes(create_model("nin_d2l"), "nin_d2l")
    assert [(r.name, r.shape) for r in rows] == [
        ("block1", (96, 54, 54)), ("pool1", (96, 26, 26)), ("block2", (256, 26, 26)), ("pool2", (256, 12, 12)),
        ("block3", (384, 12, 12)), ("pool3", (384, 5, 5)), ("drop1", (384, 5, 5)), ("block4", (10, 5, 5)),
        ("gap", (10, 1, 1)), ("flatten", (10,))]
    assert sum(r.params for r in rows) == 1_992_166


class TooSmall(torch.nn.Module):
    """Stages whose second needs a larger map than the first leaves (the registered models refuse such inputs
    when they are built; a model a user brings may not)."""

    input_size = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(1, 2, 5), torch.nn.MaxPool2d(6)

    def named_stages(self):
        yield from (("conv", self.conv), ("pool", self.pool))


def test_stage_shapes_names_the_stage_where_a_small_input_runs_out_and_keeps_the_mode():
    model = TooSmall().train()
    with pytest.raises(NinError, match=r"input 1x8x8 is too small for tiny: stage pool failed"):
        stage_shapes(model, "tiny")
    assert model.training


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """nin28 for a few steps on a 3-class image folder of 60 images (12 held out for testing)."""
    root = tmp_path_factory.mktemp("lib")
    x, y = synthetic_images(60, classes=3, size=12)
    for i, (img, label) in enumerate(zip(x, y)):
        (root / "images" / f"c{int(label)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(root / "images" / f"c{int(label)}" / f"{i:02d}.png")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert main(["train", "--dataset", f"folder:{root / 'images'}", "--epochs", "1", "--batch-size", "8",
                     "--threads", "1", "--amp", "none", "--out", str(root / "run"), "--quiet"]) == 0
    torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture
def trained(run, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return load_trained(run, "cpu")


def test_evaluate_trained_counts_every_test_image_once(trained):
    ev = evaluate_trained(trained, batch_size=2)
    assert ev.confusion.shape == (3, 3) and ev.examples == int(ev.confusion.sum())
    assert ev.examples == sum(int(n) for n in ev.confusion.sum(1))  # each image in exactly one row
    assert ev.accuracy == pytest.approx(float(ev.confusion.diag().sum()) / ev.examples)
    per_class = [float(ev.confusion[i, i]) / max(int(ev.confusion[i].sum()), 1) for i in range(3)]
    assert ev.per_class == pytest.approx(per_class)
    assert evaluate_trained(trained, batch_size=1000).confusion.tolist() == ev.confusion.tolist()  # any batch


def test_write_evaluation_writes_both_files_and_never_replaces_them_without_force(trained, tmp_path):
    ev = evaluate_trained(trained)
    png, doc = write_evaluation(ev, tmp_path / "out")
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(doc.read_text())["test_acc"] == ev.accuracy
    before = doc.read_bytes(), png.read_bytes()
    with pytest.raises(OutputExists):
        write_evaluation(ev, tmp_path / "out")
    assert (doc.read_bytes(), png.read_bytes()) == before
    write_evaluation(ev, tmp_path / "out", force=True)


@pytest.mark.slow
def test_an_evaluation_with_tta_says_so_and_is_written_beside_the_plain_one(trained, tmp_path):
    plain, tta = evaluate_trained(trained), evaluate_trained(trained, tta=True)
    assert not plain.tta and tta.tta and tta.examples == plain.examples and not trained.model.training
    assert [p.name for p in write_evaluation(plain, tmp_path)] == ["confusion.png", "evaluation.json"]
    assert [p.name for p in write_evaluation(tta, tmp_path)] == ["confusion-tta.png", "evaluation-tta.json"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["tta"] is False
    assert json.loads((tmp_path / "evaluation-tta.json").read_text())["tta"] is True


def test_grid_panels_lay_out_rows_of_eight_with_true_and_predicted_classes(trained):
    panels, title = grid_panels(trained, 11)
    assert [len(row) for row in panels] == [GRID_COLUMNS, 11 - GRID_COLUMNS]
    assert title == "nin28: top class map of 11 test images"
    assert all(p["map"].min() >= 0 and p["map"].max() <= 1 for row in panels for p in row)
    few, _ = grid_panels(trained, 1000)  # at most the test split
    assert sum(len(row) for row in few) == len(trained.test_split().images)


def test_image_panels_give_each_image_a_row_of_its_top_classes(trained):
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    panels, title = image_panels(trained, images, top_k=5)
    assert [len(row) for row in panels] == [3, 3]  # top 5 of 3 classes: all three
    assert title == "nin28: class maps of the top 3 classes"


def ended(**kw) -> SimpleNamespace:
    """A finished run's result, as nin.training.run.train returns it, with ``kw`` changed."""
    trainer = SimpleNamespace(device=torch.device("cpu"), step=7, epoch=1, pos=SimpleNamespace(batch=3), rollbacks=[],
                              lr_scale=1.0)
    history = [{"train_loss": 0.5, "train_acc": 0.8, "test_acc": 0.75, "epoch_time": 2.0, "examples_per_sec": 100.0}]
    return SimpleNamespace(**{"history": history, "run_dir": Path("runs/r"), "checkpoint": Path("runs/r/ck/step-7"),
                              "trainer": trainer, "skipped": [], "best": None, "signals": [], **kw})


def test_result_lines_of_a_finished_run_are_the_seeds_summary_and_where_it_went():
    out, err = result_lines(ended())
    assert out == ["loss 0.500, train acc 0.800, test acc 0.750", "100.0 examples/sec on cpu",
                   "run directory: runs/r  (checkpoint: runs/r/ck/step-7)"] and err == []
    r = ended(best=Path("runs/r/ck/step-3"))
    r.trainer.rollbacks, r.trainer.lr_scale = [{}, {}], 0.25
    out, _ = result_lines(r)
    assert out[2] == ("rolled back 2 time(s) after a non-finite loss; the learning rate ended x0.25 (log: "
                      "runs/r/rollbacks.jsonl)")
    assert out[3] == "run directory: runs/r  (checkpoint: runs/r/ck/step-7, best: runs/r/ck/step-3)"


def test_result_lines_of_a_stopped_run_name_the_checkpoint_and_the_command_that_continues_it():
    out, err = result_lines(ended(signals=[int(signal.SIGTERM)]))
    assert out == [] and err == ["stopped by SIGTERM at step 7 (epoch 2, batch 3); checkpoint: runs/r/ck/step-7",
                                 "to continue: nin train --resume runs/r"]
    out, err = result_lines(ended(history=[]))
    assert out == ["stopped before the end of the first epoch; checkpoint: runs/r/ck/step-7"] and err == []


def test_result_lines_warn_of_skipped_images_naming_the_first_five():
    skipped = [(f"img{i}.png", "bad") for i in range(7)]
    out, err = result_lines(ended(skipped=skipped))
    assert err == ["nin: warning: skipped 7 undecodable image(s): img0.png, img1.png, img2.png, img3.png, img4.png "
                   "... (listed in runs/r/config.json)"]
    assert out[-1].startswith("run directory:")
    assert result_lines(ended(skipped=skipped[:1]))[1][0].startswith("nin: warning: skipped 1 undecodable image(s): "
                                                                       "img0.png (listed")
