"""benchmarks/tta_views.py: its views move pixels the way they say, it scores two real held-out runs and their
ensemble, and it refuses what it must (a run without held-out images, runs on different ones, unknown views)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def views() -> dict:
    return runpy.run_path(str(ROOT / "benchmarks" / "tta_views.py"), run_name="bench")


def test_views_mirror_and_shift_with_the_edge_repeated(views):
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    view = views["view"]
    assert torch.equal(view(x, 0, 0, 0), x)
    assert torch.equal(view(x, 1, 0, 0), x.flip(-1))
    right = view(x, 0, 1, 0)  # moved one pixel right: the left column repeats
    assert torch.equal(right[0, 0], torch.tensor([[0.0, 0, 1], [3, 3, 4], [6, 6, 7]]))
    down = view(x, 0, 0, 1)
    assert torch.equal(down[0, 0], torch.tensor([[0.0, 1, 2], [0, 1, 2], [3, 4, 5]]))
    assert all(len(set(v)) == len(v) for v in views["VIEWS"].values())  # no view counted twice


def holdout_run(root: Path, holdout: int, max_steps: int | None = None) -> Path:
    from nin.training.config import preset
    from nin.training.run import train

    cfg = preset("default")
    cfg.data.subset, cfg.data.holdout = 2048, holdout
    cfg.train.epochs, cfg.train.channels_last, cfg.train.max_steps = 2, False, max_steps
    out = root / f"run-{holdout}"
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist):
    root = tmp_path_factory.mktemp("tta-views")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield [holdout_run(root, 300), holdout_run(root, 200, max_steps=1)]  # trained; one step on others
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_scores_each_view_set_and_ensembles(views, runs, capsys):
    run = str(runs[0])
    assert views["main"]([run, run, "--views", "none,flip,flip+x1", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("machine: ") and len(out) == 4
    assert out[1] == out[2] and out[1].startswith(f"{run} (300 held out): none ")
    cells = out[1].split()[4:]
    assert cells[0::2] == ["none", "flip", "flip+x1"]
    accs = [float(c.rstrip("%")) for c in cells[1::2]]
    assert all(40 < a <= 100 for a in accs), out[1]  # two epochs on 2,048 images learn
    assert all(abs(a * 3 - round(a * 3)) < 0.02 for a in accs)  # a count of 300 images, to 2 places
    assert out[3] == f"ensemble (flip) of {run} + {run}: {cells[3]}"  # a run averaged with itself is itself


@pytest.mark.slow
def test_refuses_runs_it_cannot_compare_with_one_line(views, runs, tiny_run, capsys):
    assert views["main"]([str(runs[0]), str(runs[1]), "--views", "none"]) == 2  # 300 held out, then 200
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the first run's" in err and "Traceback" not in err
    assert views["main"]([str(tiny_run), "--views", "none"]) == 2  # no --holdout: the test set is never scored
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not trained with --holdout" in err
    assert views["main"]([str(runs[0]), "--views", "flip,upside-down"]) == 2
    assert "unknown view set 'upside-down'" in capsys.readouterr().err
    assert views["main"]([str(runs[0]), "--views", " , "]) == 2
    assert "--views names no view set" in capsys.readouterr().err
    assert views["main"]([str(runs[0].parent / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tta_views: ") and "Traceback" not in err
    assert views["main"]([str(runs[0]), "--ensembles", "0"]) == 2
    assert "--ensembles must be at least 1" in capsys.readouterr().err
