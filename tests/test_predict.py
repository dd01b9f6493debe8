"""nin predict: files are preprocessed exactly as the run's test images; top-k, folders, JSON, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from nin.cli.main import main
from nin.data.loader import DeviceLoader
from nin.data.sources import load_split
from nin.inference.trained import load_trained


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def test_images(fashion_mnist):
    x, y = load_split("fashion-mnist", "test")
    return x[:6], y[:6]


def save_pngs(folder, images, mode="L", scale=1):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{i}.png"
        pic = Image.fromarray(img[0].numpy())
        if scale != 1:
            pic = pic.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
        pic.convert(mode).save(p)
        paths.append(p)
    return paths


def test_predict_gives_the_probabilities_of_the_runs_own_pipeline(run_dir, test_images, tmp_path, capsys):
    x, _ = test_images
    paths = save_pngs(tmp_path / "imgs", x)
    trained = load_trained(run_dir, "cpu")
    loader = DeviceLoader(x, torch.zeros(len(x), dtype=torch.long), 64, size=trained.size, mean=trained.mean,
                          std=trained.std)
    with torch.no_grad():
        expected = torch.cat([trained.model(b).softmax(1) for b, _ in loader])
    assert main(["predict", str(run_dir), *map(str, paths), "--top-k", "3", "--json", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in doc["predictions"]] == [str(p) for p in paths] and doc["errors"] == []
    for row, probs in zip(doc["predictions"], expected):
        top = probs.topk(3)
        assert [t["class"] for t in row["top"]] == [trained.classes[i] for i in top.indices]
        assert [t["probability"] for t in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_any_size_and_mode_and_folders_are_accepted(run_dir, test_images, tmp_path, capsys):
    x, _ = test_images
    plain = save_pngs(tmp_path / "a", x[:2])
    big_rgb = save_pngs(tmp_path / "b" / "deeper", x[:2], mode="RGB", scale=4)  # 112x112 RGB
    assert main(["predict", str(run_dir), str(plain[0]), str(tmp_path / "b"), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(plain[0]), *map(str, big_rgb)]
    assert all(len(line.split(", ")) == 1 for line in lines)  # top-1 only
    # the same picture at 4x in RGB is scaled back down to 28x28 grey: the same class (resampling moves the odds)
    same = main(["predict", str(run_dir), str(plain[0]), str(big_rgb[0]), "--top-k", "1"])
    first, second = capsys.readouterr().out.splitlines()
    assert same == 0 and first.split(": ")[1].split()[0] == second.split(": ")[1].split()[0]


def test_unreadable_files_are_named_one_line_each_and_the_rest_are_still_classified(run_dir, test_images, tmp_path,
                                                                                    capsys):
    good = save_pngs(tmp_path / "imgs", test_images[0][:1])[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.jpg"
    assert main(["predict", str(run_dir), str(good), str(broken), str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and out.count("\n") == 1
    assert err.splitlines() == [f"nin: error: {broken}: cannot decode image: cannot identify image file '{broken}'",
                                f"nin: error: {missing}: no such file or directory"]
    assert main(["predict", str(run_dir), str(broken)]) == 2  # nothing could be classified


@pytest.mark.parametrize("argv,needle", [
    (["predict", "/no/such/run", "x.png"], "/no/such/run"),
    (["predict", "RUN", "x.png", "--top-k", "0"], "expected an integer in [1, 100,000]"),
    (["predict", "RUN"], "the following arguments are required: IMAGE"),
])
def test_bad_predict_arguments_are_one_line(run_dir, capsys, argv, needle):
    assert main([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_an_empty_folder_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run_dir), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"nin: error: {tmp_path / 'empty'}: no image files in this folder\n"
