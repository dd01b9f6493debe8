"""Studies: the registry's budgets build, the runner records, reuses and reports, divergence is reported."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from PIL import Image

from nin.cli.main import main
from nin.errors import NinError
from nin.experiments.study import (
    BUDGETS,
    STUDIES,
    Budget,
    Study,
    StudyConfig,
    Variant,
    load_records,
    run_study,
    variant_config,
)
from nin.experiments.study_report import write_report
from nin.training.config import override, preset

CASES = [(s, b, v) for s in STUDIES.values() for b in BUDGETS for v in s.budgets[b].variants]


@pytest.mark.parametrize("study,budget,variant", CASES, ids=[f"{s.name}-{b}-{v.label}" for s, b, v in CASES])
def test_every_variant_of_every_budget_is_a_valid_run_with_a_model(study, budget, variant):
    from nin.experiments.study import _model_cost

    cfg = variant_config(study, StudyConfig(budget=budget), variant, seed=2)
    cfg.train.validate()
    assert cfg.seed == 2
    for path, value in variant.changes.items():  # the variant's own changes win over the budget's
        node = cfg.to_dict()
        for key in path.split("."):
            node = node[key]
        assert node == value, path
    params, macs = _model_cost(cfg)
    assert params > 0 and macs > 0


def test_studies_cover_the_seed_exercises_at_both_budgets():
    assert list(STUDIES) == ["lr", "mlp-layers", "head", "regularization", "init"]
    lr = STUDIES["lr"]
    assert [v.value for v in lr.budgets["cpu"].variants] == [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
    full = variant_config(lr, StudyConfig(budget="full"), lr.budgets["full"].variants[3], 0)
    assert (full.model.name, full.model.init, full.train.lr, full.train.epochs, full.train.batch_size,
            full.data.resize, full.data.subset) == ("nin_d2l", "xavier", 0.1, 10, 128, 224, None)
    head = {v.label: v.changes for v in STUDIES["head"].budgets["full"].variants}
    assert head["one-step + GAP"] == {"model.options.head_width": 10}  # d2l's 384x5x5 -> 10x5x5
    assert head["gradual (384) + FC"] == {"model.options.head_width": 384, "model.options.head": "fc"}


def test_changes_to_unknown_settings_are_refused():
    """Studies change settings through the one override path that flags and tuning use."""
    with pytest.raises(NinError, match="no setting 'train.lrate'; did you mean 'train.lr'"):
        override(preset("default"), {"train.lrate": 0.2})
    cfg = override(preset("default"), {"model.options.width": 0.5, "train.lr": 0.1, "seed": 2})
    assert cfg.model.options == {"width": 0.5} and cfg.train.lr == 0.1 and cfg.seed == 2
    assert preset("default").train.lr == 0.2  # a copy: the preset is unchanged


# ------------------------------------------------------------------ the runner, on a small image folder


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for k in range(3):  # learnable: each class has its own brightness
        (root / f"c{k}").mkdir(parents=True)
        for i in range(16):
            img = np.clip(rng.normal(60 + 70 * k, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{k}" / f"{i}.png")
    return root


def tiny_study(root, lrs=(0.05, 1000.0)) -> Study:
    base = {"data.dataset": f"folder:{root}", "data.test_fraction": 0.25, "train.epochs": 2,
            "train.batch_size": 12, "train.schedule": "constant", "train.warmup": 0.0, "train.channels_last": False,
            "model.options.width": 0.25, "model.options.batch_norm": False}
    variants = tuple(Variant(f"lr={lr:g}", {"train.lr": lr}, lr) for lr in lrs)
    b = Budget("a tiny folder", "default", base, variants, seeds=2)
    return Study("tiny", 1, "Tiny", "Does it run?", "learning rate", {"cpu": b, "full": b}, log_axis=True)


@pytest.mark.slow
def test_a_study_records_each_run_reports_mean_and_std_and_names_the_divergent_runs(folder, tmp_path, one_thread):
    study, out, lines = tiny_study(folder), tmp_path / "study", []
    records = run_study(study, StudyConfig(device="cpu"), out, log=lines.append)

    assert [(r["variant"], r["seed"]) for r in records] == [("lr=0.05", 0), ("lr=0.05", 1), ("lr=1000", 0),
                                                            ("lr=1000", 1)]
    assert len(lines) == 4 and all(line.startswith(f"[{i + 1}/4] ") for i, line in enumerate(lines))
    ok, bad = records[:2], records[2:]
    assert all(r["status"] in ("ok", "at chance") and len(r["history"]) == 2 for r in ok)
    assert all(r["status"] == "diverged" and r["diverged"]["loss"] == "nan" for r in bad)
    assert all(r["diverged"]["epoch"] in (1, 2) and r["diverged"]["step"] >= 1 for r in bad)
    assert load_records(out) == records  # one line per run, in order, as JSON

    report = write_report(study, StudyConfig(device="cpu"), out, "nin study tiny").read_text()
    accs = [r["history"][-1]["test_acc"] for r in ok]
    row = next(line for line in report.splitlines() if line.startswith("| lr=0.05 |"))
    assert f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}" in row
    for r in bad:
        d = r["diverged"]
        assert f"lr=1000, seed {r['seed']}: loss nan at step {d['step']} (epoch {d['epoch']})." in report
    assert "torch" in report and "`nin study tiny`" in report
    for png in ("curves.png", "sweep.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "configs" / "lr0.05.json").read_text())
    assert saved["train"]["lr"] == 0.05 and saved["data"]["dataset"] == f"folder:{folder}"
    meta = json.loads((out / "study.json").read_text())
    assert (meta["study"], meta["version"], meta["budget"], meta["seeds"]) == ("tiny", 1, "cpu", [0, 1])
    assert meta["env"]["torch"] and meta["env"]["device"] == "cpu"


@pytest.mark.slow
def test_running_again_reuses_recorded_runs_and_finishes_an_interrupted_one(folder, tmp_path, one_thread,
                                                                           monkeypatch):
    study, out = tiny_study(folder, lrs=(0.05,)), tmp_path / "study"
    first = run_study(study, StudyConfig(device="cpu", seeds=1), out, log=lambda _: None)

    import nin.training.run

    def no_training(*a, **k):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(nin.training.run, "train", no_training)
    lines = []
    assert run_study(study, StudyConfig(device="cpu", seeds=1), out, log=lines.append) == first
    assert "recorded" in lines[0]
    monkeypatch.undo()

    # a second seed whose run crashed before its first checkpoint: only its config.json is left
    crashed = out / "runs" / "lr0.05-seed1"
    crashed.mkdir(parents=True)
    (crashed / "config.json").write_text("{}")
    records = run_study(study, StudyConfig(device="cpu", seeds=2), out, log=lambda _: None)
    assert [r["seed"] for r in records] == [0, 1] and records[0] == first[0]
    assert len(load_records(out)) == 2 and (crashed / "metrics.jsonl").exists()


@pytest.mark.slow
def test_changed_settings_or_another_study_in_the_same_folder_are_refused(folder, tmp_path, one_thread):
    study, out = tiny_study(folder, lrs=(0.05,)), tmp_path / "study"
    run_study(study, StudyConfig(device="cpu", seeds=1), out, log=lambda _: None)
    with pytest.raises(NinError, match="recorded with other settings"):
        run_study(study, StudyConfig(device="cpu", seeds=1, epochs=1), out, log=lambda _: None)
    with pytest.raises(NinError, match="holds study 'tiny' version 1 budget 'cpu'; use another --out"):
        run_study(STUDIES["init"], StudyConfig(), out, log=lambda _: None)


# ------------------------------------------------------------------ the command


def test_study_list_names_every_study_and_budget(capsys):
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for name, study in STUDIES.items():
        assert name in out and study.budgets["cpu"].description in out and study.budgets["full"].description in out


@pytest.mark.parametrize("argv,needle", [
    (["study", "learning-rate"], "unknown study 'learning-rate' (available: lr, mlp-layers"),
    (["study", "lr", "--budget", "tiny"], "invalid choice: 'tiny'"),
    (["study", "lr", "--seeds", "0"], "expected an integer in [1, 1000]"),
])
def test_bad_study_arguments_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_study_flags_are_the_config_fields_and_the_report_names_what_differs_from_the_defaults():
    from nin.cli.main import build_parser
    from nin.cli.options import given_fields

    args = build_parser().parse_args(["study", "lr", "--seeds", "2", "--on-diverge", "rollback", "--data-dir", "d",
                                      "--device", "auto"])
    sc = StudyConfig(**given_fields(args, StudyConfig))
    assert (sc.budget, sc.seeds, sc.epochs, sc.on_diverge, sc.data_dir, sc.device) == ("cpu", 2, None, "rollback",
                                                                                       "d", "auto")
    # the budget and --out always; the rest where they differ from the defaults, in the flags' order
    assert sc.command("lr", "runs/x") == "nin study lr --budget cpu --seeds 2 --data-dir d --on-diverge rollback " \
                                         "--out runs/x"
    assert StudyConfig(budget="full").command("init", "o") == "nin study init --budget full --out o"
    cfg = variant_config(STUDIES["lr"], sc, STUDIES["lr"].budgets["cpu"].variants[0], seed=1)
    assert cfg.data.data_dir == "d" and cfg.train.on_diverge == "rollback" and cfg.seed == 1
    assert sc.seed_list(STUDIES["lr"]) == [0, 1]
    with pytest.raises(NinError, match=r"seeds must be in \[1, 1000\], got 0"):
        StudyConfig(seeds=0).seed_list(STUDIES["lr"])


def test_report_only_without_runs_is_one_line(capsys, tmp_path):
    assert main(["study", "head", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished runs of study 'head'" in err


@pytest.mark.slow
def test_with_rollback_a_study_records_each_rollback_of_a_run(folder, tmp_path, one_thread):
    study, out = tiny_study(folder, lrs=(1000.0,)), tmp_path / "study"
    sc = StudyConfig(device="cpu", seeds=1, on_diverge="rollback")
    (record,) = run_study(study, sc, out, log=lambda _: None)
    assert record["config"]["train"]["on_diverge"] == "rollback"
    assert record["status"] == "diverged" and record["diverged"]["loss"] == "nan"
    assert [e["lr_scale"] for e in record["rollbacks"]] == [0.5, 0.25, 0.125]  # then it gave up
    report = write_report(study, sc, out, "nin study tiny --on-diverge rollback").read_text()
    assert report.count("lr=1000, seed 0: rolled back at step") == 3 and "learning rate x0.125 from there" in report


def test_a_run_recorded_before_a_setting_existed_still_counts_as_the_same_run():
    from nin.experiments.study import _recorded_config
    from nin.training.config import preset

    cfg = preset("default").to_dict()
    older = json.loads(json.dumps(cfg))
    for added in ("ema", "tensorboard", "tensorboard_every"):  # settings newer than some recorded studies
        del older["train"][added]
    del older["data"]["erase"]
    assert _recorded_config({"config": older}) == json.loads(json.dumps(cfg))
    changed = json.loads(json.dumps(older))
    changed["train"]["lr"] = 0.05
    assert _recorded_config({"config": changed}) != json.loads(json.dumps(cfg))
    assert _recorded_config({"config": {"train": {"nope": 1}}}) is None and _recorded_config({}) is None
