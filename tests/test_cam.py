"""Class activation maps: each map's mean is its logit; nin cam draws them for files and test images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nin.cli.main import main
from nin.errors import NinError
from nin.inference.cam import check_cam_model, class_maps, upsample
from nin.models import create_model, init_weights, list_models


@pytest.mark.parametrize("name", list_models("nin"))
def test_each_class_map_averages_to_its_logit(name):
    torch.manual_seed(0)
    model = init_weights(create_model(name, width=0.25), "kaiming").eval()
    x = torch.randn(3, *model.input_size)
    logits, maps = class_maps(model, x)
    assert maps.shape[:2] == (3, 10) and maps.shape[2] > 1
    torch.testing.assert_close(maps.mean((2, 3)), logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("model", [create_model("nin28", head="fc"), create_model("lenet")], ids=["fc", "lenet"])
def test_models_without_class_maps_are_refused(model):
    with pytest.raises(NinError, match="averages one map per class"):
        check_cam_model(model)


def test_upsampled_maps_fill_the_image_and_span_zero_to_one():
    maps = torch.randn(2, 10, 7, 7)
    up = upsample(maps, (28, 20))
    assert up.shape == (2, 10, 28, 20)
    assert torch.allclose(up.flatten(2).min(-1).values, torch.zeros(2, 10), atol=1e-6)
    assert torch.allclose(up.flatten(2).max(-1).values, torch.ones(2, 10), atol=1e-6)


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cam_grid_and_files_write_a_png(run_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["cam", str(run_dir), "--grid", "10", "--out", str(grid)]) == 0
    assert is_png(grid) and f"wrote {grid}" in capsys.readouterr().out
    img = tmp_path / "shoe.jpg"
    Image.new("L", (60, 40), 30).save(img)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = tmp_path / "files.png"
    assert main(["cam", str(run_dir), str(img), str(broken), "--top-k", "2", "--out", str(files)]) == 1
    out, err = capsys.readouterr()
    assert is_png(files) and err.startswith(f"nin: error: {broken}: cannot decode image")


@pytest.mark.parametrize("argv,needle", [
    (["cam", "RUN"], "give IMAGE files or --grid N"),
    (["cam", "RUN", "x.png", "--grid", "4"], "give IMAGE files or --grid N"),
    (["cam", "RUN", "--grid", "4", "--out", "cam.jpg"], "--out must be a .png file"),
    (["cam", "RUN", "--grid", "0"], "expected an integer in [1, 256]"),
])
def test_bad_cam_arguments_are_one_line(run_dir, capsys, argv, needle):
    assert main([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
