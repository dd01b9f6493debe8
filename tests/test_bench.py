"""`nin bench`: the measuring pieces, a tiny end-to-end run, the baseline side by side, and bad input."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from nin.analysis.bench import SWITCHES, BenchConfig, _flipped, process_age, run_bench, time_to_accuracy
from nin.analysis.probes import matmul_peak, peak_memory, reset_peak_memory
from nin.cli.main import main
from nin.errors import NinError
from nin.training.config import TrainConfig, preset
from nin.training.memory import _FreedMemoryKept

CPU = torch.device("cpu")
TINY = dict(warmup=1, steps=1, repeats=2, latency_runs=2, data="synthetic")


def test_matmul_peak_is_a_plausible_rate(one_thread):
    peak = matmul_peak(CPU, torch.float32, min_seconds=0.001, reps=2)
    assert 1e8 < peak < 1e13


def test_peak_memory_window_sees_a_new_allocation_and_resets():
    reset_peak_memory(CPU)
    before = peak_memory(CPU)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    during = peak_memory(CPU)
    del x
    # glibc may keep the freed block in its heap (how depends on what the process freed before, e.g. a
    # training run in an earlier test): give it back, so the new window starts below the old peak
    _FreedMemoryKept.release()
    reset_peak_memory(CPU)
    after = peak_memory(CPU)
    assert during >= before + 48 * 2**20
    assert after < during


def test_process_age_counts_from_process_start():
    assert 0 < process_age() < 24 * 3600


@pytest.mark.slow
def test_a_tiny_run_reports_every_figure(one_thread):
    lines: list[str] = []
    out = run_bench(BenchConfig(model="nin28", batch_size=16, **TINY), report=lines.append)
    (case,) = out["cases"]
    for key in ("train_img_s", "infer_img_s", "latency_ms", "train_peak_bytes", "infer_peak_bytes", "train_mfu"):
        assert case[key] > 0, key
    assert out["flops_forward"] == 12_261_760 and out["steps_per_block"] == 1
    assert out["data"].startswith("synthetic")
    text = "\n".join(lines)
    assert "nin28 1x28x28, batch 16" in text and "peak FLOP/s" in text and "train MFU" in text
    assert case["settings"]["fold_bn"] and not case["settings"]["compile"]


@pytest.mark.slow
def test_ablation_flips_each_switch_once(one_thread):
    lines: list[str] = []
    # every switch but compile, whose first compile alone takes 30-60 s on a CPU (compiled training has its own
    # test); _flipped's rule for it is checked below
    switches = [s for s in SWITCHES if s != "compile"]
    out = run_bench(BenchConfig(model="nin28", batch_size=16, train=TrainConfig(amp="none"), **TINY), ablate=switches,
                    report=lines.append)
    names = [c["name"] for c in out["cases"]]
    assert names == ["nin", "channels_last off", "fused off", "fold_bn off", "amp bf16"]
    assert out["cases"][1]["settings"]["channels_last"] is False
    assert out["cases"][3]["settings"]["fold_bn"] is False
    assert out["cases"][4]["dtype"] == "bf16"
    assert sum(line.count("x, infer") for line in lines) == 4
    assert _flipped("compile", False) == ("compile on", True) and _flipped("amp", "fp16") == ("amp none", "none")


@pytest.mark.slow
def test_ablation_of_chosen_switches_flips_from_the_resolved_value(one_thread):
    out = run_bench(BenchConfig(model="nin28", batch_size=16, train=TrainConfig(channels_last=False), **TINY),
                    ablate=["channels_last"], report=lambda _: None)
    assert [c["name"] for c in out["cases"]] == ["nin", "channels_last on"]
    assert out["cases"][1]["settings"]["channels_last"] is True
    with pytest.raises(NinError, match="unknown switch"):
        run_bench(BenchConfig(model="nin28", **TINY), ablate=["warp"], report=lambda _: None)


@pytest.mark.slow
def test_baseline_runs_side_by_side_and_prints_ratios(one_thread):
    lines: list[str] = []
    out = run_bench(BenchConfig(model="nin_d2l", size=96, batch_size=4, workers=0, **TINY), baseline=True,
                    report=lines.append)
    fast, base = out["cases"]
    assert base["name"] == "seed's way" and base["dtype"] == "fp32" and not base["settings"]["channels_last"]
    assert base["train_img_s"] > 0 and base["infer_img_s"] > 0 and base["latency_ms"] > 0
    assert any(line.startswith("speed-up") for line in lines)


def test_baseline_is_only_for_the_seed_model():
    with pytest.raises(NinError, match="--model nin_d2l"):
        run_bench(BenchConfig(model="nin28", **TINY), baseline=True, report=lambda _: None)


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=0), r"batch_size must be in \[1, 2\*\*20\], got 0"), (dict(repeats=0), "repeats"),
    (dict(steps=0), "steps"), (dict(block_seconds=float("inf")), "block_seconds"),
    (dict(data="imagenet"), "data choice"), (dict(model="nin_d2l", size=8), "does not fit"),
])
def test_bad_settings_are_one_clear_error(bad, match):
    with pytest.raises(NinError, match=match):
        run_bench(BenchConfig(**{**TINY, **bad}), report=lambda _: None)


@pytest.mark.slow
def test_time_to_accuracy_reports_when_targets_are_reached(fashion_mnist, one_thread):
    cfg = preset("default")
    cfg.data.subset, cfg.data.test_subset, cfg.train.epochs = 2000, 1000, 2
    lines: list[str] = []
    out = time_to_accuracy(cfg, [0.5, 0.999], report=lines.append)
    assert len(out["epochs"]) == 2
    hit = out["targets"]["0.5"]
    assert hit is not None and hit["test_acc"] >= 0.5 and 0 < hit["seconds"] <= out["seconds"]
    assert out["targets"]["0.999"] is None
    assert any("50.00%: reached at" in line for line in lines)
    assert any("99.90%: not reached" in line for line in lines)


@pytest.mark.slow
def test_cli_bench_json(capsys, one_thread):
    code = main(["bench", "--model", "nin28", "--batch-size", "8", "--steps", "1", "--repeats", "1",
                 "--latency-runs", "1", "--data", "synthetic", "--json", "--no-channels-last"])
    out, err = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == "nin28" and doc["cases"][0]["settings"]["channels_last"] is False
    assert "train img/s" in err  # the table goes to stderr with --json


@pytest.mark.parametrize("argv, match", [
    (["bench", "--model", "nope"], "unknown model"),
    (["bench", "--model", "nin28", "--baseline"], "--model nin_d2l"),
    (["bench", "--batch-size", "0"], "expected an integer in [1, 2**20]"),
    (["bench", "--time-to-accuracy", "--targets", "0.9,abc"], "--targets"),
    (["bench", "--time-to-accuracy", "--targets", "1.5"], "--targets"),
    (["bench", "--data", "imagenet"], "invalid choice"),
])
def test_cli_bench_bad_input_is_one_line(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------ the command's settings (nin.analysis.bench_command)


def bench_parser():
    from nin.cli.main import build_parser

    return build_parser()._subparsers._group_actions[0].choices["bench"]


def test_bench_flags_are_derived_from_the_config_fields_and_only_what_is_given_changes():
    from dataclasses import fields

    from nin.analysis.bench_command import TimeToAccuracy, bench_config
    from nin.cli.options import SETTING, settings_given

    actions = {a.dest: a for a in bench_parser()._actions}
    for cls, section in ((BenchConfig, "bench."), (TimeToAccuracy, "tta.")):
        for f in fields(cls):
            if f.metadata.get("help"):
                action = actions[SETTING + section + f.name]
                assert action.help == f.metadata["help"] and action.default is None, f.name
    assert actions[SETTING + "bench.steps"].option_strings == ["--steps"]
    given = settings_given(bench_parser().parse_args(["--steps", "2", "--no-fused", "--amp", "none", "--size", "32"]))
    assert given == {"bench.size": 32, "bench.steps": 2, "bench.train.amp": "none", "bench.train.fused": False}
    cfg = bench_config(given)
    assert (cfg.steps, cfg.size, cfg.train.amp, cfg.train.fused) == (2, 32, "none", False)
    assert cfg.model == "nin_d2l" and cfg.repeats == 3 and cfg.train.fold_bn is True  # the rest: the defaults
    assert bench_config({}) == BenchConfig()


def test_a_result_records_the_settings_flat_as_before():
    cfg = BenchConfig(train=TrainConfig(amp="none", fused=False))
    settings = cfg.settings()
    assert list(settings) == ["model", "size", "batch_size", "device", "amp", "channels_last", "compile", "fused",
                              "fold_bn", "warmup", "steps", "block_seconds", "repeats", "latency_runs", "data",
                              "data_dir", "workers"]
    assert settings["amp"] == "none" and settings["fused"] is False and settings["batch_size"] == 128
    flipped = cfg.with_switch("fused", True)
    assert flipped.train.fused is True and cfg.train.fused is False and flipped.train.amp == "none"


@pytest.mark.parametrize("given, what, says", [
    ({"tta.targets": "0.5"}, "speed", "bench: --targets is for --time-to-accuracy"),
    ({"bench.device": "cpu", "tta.subset": 10}, "speed", "bench: --subset is for --time-to-accuracy"),
    ({"bench.steps": 1}, "time-to-accuracy", "bench: --steps is for the speed benchmark, not --time-to-accuracy"),
    ({"bench.model": "nin28"}, "time-to-accuracy", "bench: --model is for the speed benchmark"),
])
def test_a_setting_the_mode_would_ignore_is_refused(given, what, says):
    from nin.analysis.bench_command import check_mode

    with pytest.raises(NinError, match=f"^{re.escape(says)}"):
        check_mode(given, what)


def test_each_mode_takes_its_own_and_the_shared_settings():
    from nin.analysis.bench_command import check_mode

    shared = {"bench.device": "cpu", "bench.data_dir": "d", "bench.train.amp": "none", "bench.train.fused": False}
    check_mode({**shared, "tta.epochs": 2, "tta.preset": "d2l"}, "time-to-accuracy")
    check_mode({**shared, "bench.steps": 1, "bench.workers": 0}, "speed", baseline=True, ablate="all")
    with pytest.raises(NinError, match="--baseline is for the speed benchmark"):
        check_mode(shared, "time-to-accuracy", baseline=True)
    with pytest.raises(NinError, match="--ablate is for the speed benchmark"):
        check_mode({}, "time-to-accuracy", ablate="")


def test_time_to_accuracy_trains_the_preset_changed_only_by_the_settings_given():
    from nin.analysis.bench_command import tta_config

    tta, cfg = tta_config({"tta.preset": "d2l", "tta.epochs": 2, "tta.subset": 100, "bench.train.fused": False,
                           "bench.device": "cpu", "bench.data_dir": "/data"})
    assert tta.preset == "d2l" and tta.target_list() == [0.91, 0.93]
    assert cfg.model.name == "nin_d2l" and cfg.train.epochs == 2 and cfg.data.subset == 100
    assert cfg.train.fused is False and cfg.device == "cpu" and cfg.data.data_dir == "/data"
    assert cfg.train.amp == "none"  # the preset's: a speed switch not given is not the benchmark's default (auto)
    assert tta_config({})[1] == preset("default")


@pytest.mark.parametrize("targets, expected", [("0.5, 0.9", [0.5, 0.9]), ("1", [1.0]), ("0.9,abc", None),
                                               ("0,0.5", None), ("1.5", None), ("nan", None), (",", None)])
def test_targets_are_accuracies_in_0_to_1(targets, expected):
    from nin.analysis.bench_command import TimeToAccuracy

    if expected is None:
        with pytest.raises(NinError, match=r"--targets must be accuracies in \(0, 1\] separated by commas"):
            TimeToAccuracy(targets=targets).target_list()
    else:
        assert TimeToAccuracy(targets=targets).target_list() == expected


def test_ablate_names_all_switches_or_a_list():
    from nin.analysis.bench_command import ablated

    assert ablated("all") is True and ablated(None) == [] and ablated(" fused, amp ,") == ["fused", "amp"]


def test_the_recorded_command_repeats_every_flag_given_in_the_parsers_order(tmp_path):
    import shlex

    from nin.cli.main import build_parser
    from nin.cli.options import command_line

    out = tmp_path / "my results"
    argv = ["--time-to-accuracy", "--epochs", "2", "--no-fused", "--device", "cpu", "--json", "--record", str(out),
            "--threads", "2", "--targets", "0.5,0.6", "--amp", "none"]
    args = build_parser().parse_args(["bench", *argv])
    line = command_line(args)
    assert line == ("nin bench --device cpu --amp none --no-fused --threads 2 --time-to-accuracy --epochs 2 "
                    f"--targets 0.5,0.6 --json --record {shlex.quote(str(out))}")
    assert vars(build_parser().parse_args(shlex.split(line)[1:])) == vars(args)  # the words parse back the same
    speed = build_parser().parse_args(["bench", "--ablate", "--baseline", "--block-seconds", "0.5", "--channels-last"])
    assert command_line(speed) == "nin bench --channels-last --block-seconds 0.5 --baseline --ablate all"
    assert command_line(build_parser().parse_args(["bench"])) == "nin bench"


def test_runtime_set_up_caps_threads_at_the_usable_cores(monkeypatch):
    from nin.training.runtime import configure_runtime

    before = torch.get_num_threads()
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    try:
        configure_runtime(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(64)
        configure_runtime()
        assert torch.get_num_threads() <= len(os.sched_getaffinity(0))
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    finally:
        torch.set_num_threads(before)


def test_time_to_accuracy_takes_a_seed_and_a_holdout_for_the_run():
    from nin.analysis.bench_command import tta_config

    _, cfg = tta_config({"tta.seed": 7, "tta.holdout": 5000, "tta.preset": "default"})
    assert cfg.seed == 7 and cfg.data.holdout == 5000
    _, plain = tta_config({})
    assert plain.seed == 0 and plain.data.holdout is None
