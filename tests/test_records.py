"""Benchmark records (nin bench --record) and docs/performance.md, which is rendered from them."""

from __future__ import annotations

import datetime as dt
import json
import runpy
from pathlib import Path

import pytest

from nin.analysis.doctor import fingerprint
from nin.analysis.records import FORMAT, load_records, make_record, read_record, record_name, write_record
from nin.cli.main import main
from nin.errors import NinError

ROOT = Path(__file__).resolve().parent.parent
WHEN = dt.datetime(2026, 12, 1, 10, 30, 5, tzinfo=dt.timezone.utc)
MACHINE = {"kind": "cpu-avx2", "label": "x86-64 CPU with AVX2, no native bf16", "cpu": "test CPU"}


def speed_result(model="nin28", cases=1):
    case = {"name": "nin", "dtype": "fp32", "train_img_s": 10.0, "infer_img_s": 20.0, "latency_ms": 1.0}
    return {"model": model, "cases": [case] * cases}


def test_a_record_names_its_machine_and_round_trips(tmp_path):
    rec = make_record(speed_result(), "speed", "nin bench --model nin28", machine=MACHINE, when=WHEN)
    assert record_name(rec) == "20261201-103005-cpu-avx2-speed-nin28.json"
    path = write_record(rec, tmp_path / "results")  # the folder is made
    back = read_record(path)
    assert back == rec and back["format"] == FORMAT and back["machine"]["kind"] == "cpu-avx2"
    assert make_record(speed_result(), "speed", "x")["machine"] == fingerprint()  # this machine, by default


def test_a_record_is_never_overwritten(tmp_path):
    rec = make_record(speed_result(), "speed", "nin bench", machine=MACHINE, when=WHEN)
    first = write_record(rec, tmp_path)
    before = first.read_bytes()
    second = write_record({**rec, "result": speed_result(cases=3)}, tmp_path)  # same second, another result
    assert second.name == "20261201-103005-cpu-avx2-speed-nin28-ablate.json"
    assert first.read_bytes() == before
    third = write_record(rec, tmp_path)
    assert third.name == "20261201-103005-cpu-avx2-speed-nin28-2.json" and first.read_bytes() == before
    assert [r["file"] for r in load_records(tmp_path)] == sorted(p.name for p in (first, second, third))


@pytest.mark.parametrize("text, words", [
    ("{not json", "not a readable JSON record"),
    (json.dumps({"format": FORMAT, "version": 99, "what": "speed", "machine": {}, "result": {}}), "unsupported"),
    (json.dumps({"format": FORMAT, "version": 1, "what": "speed", "machine": [], "result": {}}), "needs a"),
    (json.dumps([1, 2]), "not a nin bench record"),
])
def test_a_bad_record_is_one_error_naming_the_file(tmp_path, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(NinError, match=words) as e:
        read_record(bad)
    assert "bad.json" in str(e.value) and "\n" not in str(e.value)


def test_other_json_files_beside_the_records_are_left_alone(tmp_path):
    (tmp_path / "torchrun-stress-x.json").write_text(json.dumps({"runs": []}))
    write_record(make_record(speed_result(), "speed", "nin bench", machine=MACHINE, when=WHEN), tmp_path)
    assert len(load_records(tmp_path)) == 1
    with pytest.raises(NinError, match="unknown record kind"):
        make_record({}, "latency", "x", machine=MACHINE)


@pytest.mark.slow
def test_nin_bench_record_writes_the_run_with_this_machines_fingerprint(tmp_path, capsys, one_thread):
    out = tmp_path / "results"
    args = ["bench", "--model", "nin28", "--batch-size", "8", "--steps", "1", "--repeats", "1", "--latency-runs",
            "1", "--data", "synthetic", "--amp", "none", "--record", str(out), "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    (path,) = out.glob("*.json")
    rec = read_record(path)
    assert rec["command"] == ("nin bench --model nin28 --batch-size 8 --amp none --steps 1 --repeats 1 "
                              f"--latency-runs 1 --data synthetic --json --record {out}")
    assert rec["machine"] == printed["machine"] == fingerprint()
    assert rec["result"]["cases"][0]["name"] == "nin" and rec["result"]["model"] == "nin28"
    assert path.name.startswith(rec["recorded"][:10].replace("-", "")) and f"-{fingerprint()['kind']}-" in path.name


def test_a_record_folder_that_is_a_file_fails_before_measuring(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["bench", "--model", "nin28", "--record", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err and f.read_text() == "keep me"


def test_performance_doc_is_what_the_committed_records_render():
    script = runpy.run_path(str(ROOT / "benchmarks" / "render_performance.py"), run_name="render")
    records = load_records(ROOT / "benchmarks" / "results")
    assert records, "benchmarks/results holds no records"
    text = script["render"](records)
    assert (ROOT / "docs" / "performance.md").read_text() == text, \
        "docs/performance.md is out of date: run python benchmarks/render_performance.py"
    for kind in {r["machine"]["kind"] for r in records}:  # one section per machine kind, named
        assert f"(`{kind}`)" in text


def test_every_ceiling_comes_from_its_own_records_peak():
    script = runpy.run_path(str(ROOT / "benchmarks" / "render_performance.py"), run_name="render")
    result = {"model": "nin_d2l", "input": "1x224x224", "batch_size": 128, "flops_train_step": 4.5e9,
              "flops_forward": 1.5e9, "peak_flop_s": {"fp32": 90e9, "bf16": 450e9},
              "cases": [{"name": "nin", "dtype": "bf16", "train_img_s": 50.0, "infer_img_s": 200.0, "latency_ms": 3.0,
                         "train_mfu": 0.5, "infer_mfu": 0.67},
                        {"name": "seed's way", "dtype": "fp32", "train_img_s": 10.0, "infer_img_s": 30.0,
                         "latency_ms": 9.0, "train_mfu": 0.5, "infer_mfu": 0.5}]}
    text = script["render"]([{**make_record(result, "speed", "nin bench --baseline", machine=MACHINE, when=WHEN),
                              "file": "r.json"}])
    assert "cannot train faster than **100.0 img/s**" in text  # bf16: 450 / 4.5
    assert "cannot train faster than **20.0 img/s**" in text  # fp32: 90 / 4.5
    assert "| speed-up | | 5.00x | 6.67x | 3.00x |" in text
