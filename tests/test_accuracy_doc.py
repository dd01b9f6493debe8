"""docs/accuracy.md is rendered from the records (benchmarks/render_accuracy.py), rows group seeds into
mean ± std, validation runs never show as test accuracy, and a nin train run converts into a record."""

from __future__ import annotations

import json
import runpy
import statistics
from pathlib import Path

import pytest

from nin.analysis.records import load_records, make_record

ROOT = Path(__file__).resolve().parent.parent
MACHINE = {"kind": "cpu-test", "label": "a test machine"}


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(ROOT / "benchmarks" / "render_accuracy.py"), run_name="render")


def record(command: str, accs: list[float], seed: int = 0, holdout: int | None = None, model: str = "nin28",
           seconds: float = 10.0, file: str = "r.json", **train) -> dict:
    cfg = {"model": {"name": model, "options": {}}, "data": {"holdout": holdout},
           "train": {"epochs": len(accs), **train}, "seed": seed}
    epochs = [{"epoch": i + 1, "test_acc": a, "seconds": seconds * (i + 1) / len(accs)} for i, a in enumerate(accs)]
    result = {"preset": "default", "targets": {}, "epochs": epochs, "seconds": seconds, "config": cfg}
    return {**make_record(result, "time-to-accuracy", command, machine=MACHINE), "file": file}


def test_accuracy_doc_is_what_the_committed_records_render(script):
    text = script["render"](load_records(ROOT / "benchmarks" / "results"))
    assert (ROOT / "docs" / "accuracy.md").read_text() == text, \
        "docs/accuracy.md is out of date: run python benchmarks/render_accuracy.py"


def test_seeds_of_one_command_are_one_row_with_mean_and_sample_std(script):
    runs = [record(f"nin bench --time-to-accuracy --preset fast --seed {s} --record benchmarks/results",
                   [0.9, acc], seed=s, seconds=t) for s, acc, t in ((0, 0.941, 100), (1, 0.943, 120), (2, 0.939, 90))]
    rows = script["rows"](runs, holdout=False)
    assert len(rows) == 1
    mean, std = statistics.mean([0.941, 0.943, 0.939]), statistics.stdev([0.941, 0.943, 0.939])
    assert f"{mean:.2%} ± {std:.2%}" in rows[0] and "| 0, 1, 2 |" in rows[0]
    assert "`nin bench --time-to-accuracy --preset fast`" in rows[0]  # no seed, no record folder
    assert "| 100 s |" in rows[0]  # the median time
    assert "| 116,138 | 9.92 M |" not in rows[0] and "| 79,898 | 6.13 M |" in rows[0]  # nin28's own counts


def test_a_run_fed_larger_images_counts_the_macs_at_that_size(script):
    """The same model fed 32x32 images does (32/28)^2 the work of its 28x28 run, whatever row came first."""
    plain = record("nin train --holdout 5000 --preset fast", [0.94], holdout=5000)
    larger = record("nin train --holdout 5000 --preset fast --resize 32", [0.936], holdout=5000)
    larger["result"]["config"]["data"]["resize"] = 32
    rows = script["rows"]([plain, larger], holdout=True)
    assert len(rows) == 2
    assert "| 6.13 M |" in rows[0] and "| 6.13 M |" not in rows[1] and "| 8.01 M |" in rows[1]  # 8,007,680


def test_one_command_that_stood_for_two_recipes_is_two_rows_that_say_which(script):
    """A preset changed between runs (here: --preset fast before and after it evaluated with flip TTA): its runs
    are not averaged together, and each row names the setting that sets it apart; a record from before a setting
    existed counts as today's default (off)."""
    before = [record("nin bench --preset fast", [0.937], seed=s) for s in (0, 1)]
    after = [record("nin bench --preset fast", [0.941], seed=s, tta=True) for s in (0, 1)]
    rows = script["rows"]([*before, *after], holdout=False)
    assert len(rows) == 2
    assert "(train.tta=False)" in rows[0] and "93.70% ± 0.00%" in rows[0]
    assert "(train.tta=True)" in rows[1] and "94.10% ± 0.00%" in rows[1]
    assert len(script["rows"](before, holdout=False)) == 1 and "train.tta" not in script["rows"](before, False)[0]


def test_each_ablation_is_measured_against_the_closest_run_of_the_preset(script):
    base = "nin train --holdout 5000 --preset fast"
    runs = [record(base, [0.930], holdout=5000), record(base, [0.935], holdout=5000, tta=True),
            record(base + " --epochs 16", [0.934], holdout=5000, epochs=16),
            record(base + " --no-tta", [0.931], holdout=5000, epochs=1, tta=False)]
    text = "\n".join(script["ablation_section"](runs))
    assert "| none (the preset: train.tta=False) | 1 | 93.00% | - |" in text
    assert "| none (the preset: train.tta=True) | 1 | 93.50% | - |" in text
    # against the preset without TTA, the closer of the two
    assert "| `--epochs 16` | 1 | 93.40% | +0.40 points (vs the preset: train.tta=False) |" in text
    assert "| `--no-tta` | 1 | 93.10% | +0.10 points (vs the preset: train.tta=False) |" in text


def test_a_run_of_todays_preset_from_before_it_was_the_preset_is_a_base_too(script):
    """The preset became what an older row spelt out in flags: that row is a base, and the rows close to it are
    measured against it, not against the preset as it was then."""
    base = "nin train --holdout 5000 --preset fast"
    today = "--epochs 18 --label-smoothing 0 --tta"  # what --preset fast is today, on the default model
    long = [0.5] * 17
    runs = [record(base, [0.930], holdout=5000),  # the preset then: 1 epoch, label smoothing 0.1, no TTA
            record(f"{base} {today}", long + [0.940], holdout=5000, label_smoothing=0.0, tta=True),
            record(f"{base} {today} --lr 0.4", long + [0.937], holdout=5000, label_smoothing=0.0, tta=True, lr=0.4),
            record(f"{base} --epochs 2", [0.5, 0.933], holdout=5000)]
    text = "\n".join(script["ablation_section"](runs))
    assert "| none (the preset then: " in text and "train.epochs=1" in text
    assert f"| `{today}` (today's preset) | 18 | 94.00% | - |" in text
    assert f"| `{today} --lr 0.4` | 18 | 93.70% | -0.30 points (vs `{today}`) |" in text
    assert "| `--epochs 2` | 2 | 93.30% | +0.30 points (vs the preset then) |" in text


def test_validation_runs_are_kept_apart_from_test_accuracy(script):
    test = record("nin bench --time-to-accuracy --epochs 2", [0.9, 0.91])
    val = record("nin bench --time-to-accuracy --epochs 2 --holdout 5000", [0.88, 0.95], holdout=5000)
    assert len(script["rows"]([test, val], holdout=False)) == 1
    held = script["rows"]([test, val], holdout=True)
    assert len(held) == 1 and "95.00%" in held[0]
    text = script["render"]([test, val])
    runs, validation = text.split("## Validation runs")
    assert "95.00%" not in runs and "95.00%" in validation


def test_the_chapters_runs_are_shown_epoch_by_epoch_beside_its_figures(script):
    rec = record("nin train --preset d2l", [0.21, 0.42], model="nin_d2l")
    text = script["render"]([rec])
    assert "| 2 | - | - | 0.420 |" in text and "| the chapter, after 10 | 0.563 | 0.783 | 0.772 |" in text
    assert "| `nin train --preset d2l` | cpu-test | None | 2 | - | 0.420 | 0.420 |" in text  # not 10 epochs yet


def test_the_chapters_runs_are_compared_side_by_side(script):
    d2l = record("nin train --preset d2l", [0.2 + 0.05 * i for i in range(10)], model="nin_d2l", lr=0.1)
    reader = record("nin train --preset d2l --lr 0.04 --epochs 20", [0.1] + [0.6 + 0.01 * i for i in range(19)],
                    model="nin_d2l", lr=0.04)
    text = script["render"]([d2l, reader])
    rows = [line for line in text.splitlines() if line.startswith("| `nin train --preset d2l")]
    assert rows[:2] == [
        "| `nin train --preset d2l` | cpu-test | 0.1 | 10 | 0.650 | 0.650 | 0.650 |",
        "| `nin train --preset d2l --lr 0.04 --epochs 20` | cpu-test | 0.04 | 20 | 0.680 | 0.780 | 0.780 |"]
    assert "| the chapter's printout | a GPU | 0.1 | 10 | 0.772 | - | 0.772 |" in text
    assert script["render"]([]).count("No run of the chapter's recipe is recorded yet.") == 1


@pytest.mark.slow
def test_a_finished_run_becomes_a_record_the_page_shows(tmp_path, tiny_run, script):
    convert = runpy.run_path(str(ROOT / "benchmarks" / "record_run.py"), run_name="convert")
    results = tmp_path / "results"
    assert convert["main"]([str(tiny_run), "--command", "nin train --epochs 1", "--results", str(results)]) == 0
    (rec,) = load_records(results)
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["test_acc"] for e in rec["result"]["epochs"]] == [m["test_acc"] for m in metrics]
    assert rec["source"].startswith("Converted") and rec["machine"]["kind"]
    (row,) = script["rows"]([rec], holdout=False)
    assert "(converted run)" in row and f"{metrics[-1]['test_acc']:.2%}" in row


def test_record_run_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    convert = runpy.run_path(str(ROOT / "benchmarks" / "record_run.py"), run_name="convert")
    assert convert["main"]([str(tmp_path), "--command", "x", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("record_run: ") and "not a finished run directory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_page_says_which_224_baselines_were_trained_and_which_were_not(script):
    assert any("AlexNet (`alexnet`" in line and "VGG-11 (`vgg11`" in line and "have not been trained" in line
               for line in script["baselines_224"]([]))
    held_out = record("nin train --preset d2l --model alexnet --holdout 5000", [0.88], model="alexnet", holdout=5000)
    assert not any("`alexnet` is d2l's AlexNet" in line for line in script["baselines_224"]([held_out]))
    alexnet = record("nin train --preset d2l --model alexnet --lr 0.01", [0.73, 0.88], model="alexnet", lr=0.01)
    lines = script["baselines_224"]([alexnet])
    assert any("`alexnet` is d2l's AlexNet" in line for line in lines)
    assert any("lr 0.01 for 2 epochs" in line for line in lines)  # what the record trained, not a fixed sentence
    assert any("VGG-11 (`vgg11`, 128.8 M parameters) has not been trained" in line for line in lines)
    assert not any("AlexNet (`alexnet`" in line for line in lines)


def test_a_baseline_trained_at_a_reduced_width_says_so(script):
    """d2l trains VGG-11 at a quarter of its channels: the page's sentence and its row's counts say which."""
    vgg = record("nin train --preset d2l --model vgg11 --width 0.25 --lr 0.05", [0.86, 0.91], model="vgg11",
                 lr=0.05)
    vgg["result"]["config"]["model"]["options"] = {"width": 0.25}
    (line,) = [x for x in script["baselines_224"]([vgg]) if "`vgg11` is" in x]
    assert "lr 0.05 for 2 epochs at width 0.25" in line
    (row,) = script["rows"]([vgg], holdout=False)
    assert "| 128,806,154 |" not in row and "| vgg11 | 8,060,234 |" in row  # the quarter-width network's own count
