"""benchmarks/serve_soak.py and benchmarks/serve_load.py at small counts against real ``nin serve`` processes: the
soak's checks pass (and its checker does reject wrong answers), the load table's fields are sane, and both results
go through the benchmark records into docs/performance.md's renderer. No timing assertions: speed targets live in
the benchmarks (benchmarks/serve.sh), not here."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from nin.analysis.doctor import fingerprint
from nin.analysis.records import load_records, make_record, write_record

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def script(name: str) -> dict:
    """A benchmark script's functions (imported by path; its ``main`` does not run)."""
    return runpy.run_path(str(ROOT / "benchmarks" / name), run_name="bench")


@pytest.fixture(scope="module")
def soak_script() -> dict:
    return script("serve_soak.py")


def quiet(line: str) -> None:
    pass


def answer(top: list[tuple[str, float]], file: str = "body") -> bytes:
    return json.dumps({"model": "nin28", "version": "0" * 12, "predictions": [
        {"file": file, "top": [{"class": c, "probability": p} for c, p in top]}]}).encode()


def test_the_soak_checker_rejects_every_kind_of_wrong_answer(soak_script):
    check = soak_script["check_answer"]
    want = {"a.png": [("Ankle boot", 0.9), ("Sandal", 0.05)], "b.jpg": [("Bag", 0.7), ("Shirt", 0.2)]}
    good = {"kind": "png", "expect": 200, "files": ["a.png"]}
    assert check(good, 200, answer(want["a.png"]), want) is None
    assert "5xx" in check(good, 500, b'{"error": "internal error"}', want)
    assert "no answer" in check(good, 0, b"no answer: ConnectionResetError", want)
    assert "classes" in check(good, 200, answer([("Sandal", 0.9), ("Ankle boot", 0.05)]), want)
    assert "probability" in check(good, 200, answer([("Ankle boot", 0.90002), ("Sandal", 0.05)]), want)
    assert check(good, 200, answer([("Ankle boot", 0.900004), ("Sandal", 0.05)]), want) is None  # within 1e-5
    assert "answered as" in check(good, 200, answer(want["a.png"], file="a.png"), want)
    assert "JSON" in check(good, 200, b"<html>", want)
    parts = {"kind": "multipart", "expect": 200, "files": ["a.png", "b.jpg"]}
    assert "2 files sent" in check(parts, 200, answer(want["a.png"], file="a.png"), want)
    both = json.dumps({"predictions": [{"file": n, "top": [{"class": c, "probability": p} for c, p in want[n]]}
                                       for n in ("a.png", "b.jpg")]}).encode()
    assert check(parts, 200, both, want) is None
    bad = {"kind": "oversized", "expect": 413, "files": []}
    assert check(bad, 413, b'{"error": "request body over 200,000 bytes"}', want) is None
    assert "not 413" in check(bad, 400, b'{"error": "x"}', want)
    assert "not 413" in check(bad, 200, answer(want["a.png"]), want)
    assert "without an 'error'" in check(bad, 413, b'{"detail": "too large"}', want)
    assert "without an 'error'" in check(bad, 413, b'{"error": " "}', want)
    assert "JSON" in check(bad, 413, b"Request Entity Too Large", want)


def test_5xx_counted_by_the_server_fail_the_soak(soak_script):
    metrics = ('nin_requests_total{route="/v1/predict",status="200"} 12.0\n'
               'nin_requests_total{route="/v1/predict",status="500"} 1.0\n'
               'nin_requests_total{route="/v1/predict",status="503"} 0.0\n')
    assert soak_script["server_errors"](metrics) == {'nin_requests_total{route="/v1/predict",status="500"}': 1.0}
    assert soak_script["server_errors"](metrics.replace('"500"', '"400"')) == {}


def test_every_kind_of_request_is_scheduled_first(soak_script):
    templates = [{"kind": k} for k in soak_script["KINDS"] for _ in range(2)]
    order = soak_script["schedule"](templates, 50, seed=3)
    assert len(order) == 50 and {templates[i]["kind"] for i in order[:len(soak_script["KINDS"])]} == set(
        soak_script["KINDS"])


@pytest.mark.slow
def test_a_short_soak_passes_every_check(tiny_run, soak_script, tmp_path):
    result = soak_script["soak"](tiny_run, requests=300, warmup=60, clients=4, seconds=120, progress=quiet)
    assert result["passed"], soak_script["summary"](result)
    assert not result["failures"] and not result["wrong"] and result["exit_code"] == 0
    assert set(result["sent"]) == set(soak_script["KINDS"]) and sum(result["sent"].values()) == 360
    assert result["compared"] >= sum(n for k, n in result["sent"].items() if soak_script["KINDS"][k][0] == 200)
    assert result["rss_growth_mib"] <= result["rss_bound_mib"] == 64
    assert "PASSED" in soak_script["summary"](result)
    rec = make_record(result, "serve-soak", "python benchmarks/serve_soak.py RUN --requests 300")
    assert write_record(rec, tmp_path).name.endswith("-serve-soak-nin28.json")
    render = script("render_performance.py")["render"]
    assert "Soak: 300 mixed requests" in render(load_records(tmp_path))


@pytest.mark.slow
def test_a_tiny_load_run_gives_a_sane_table(tiny_run, tmp_path):
    load = script("serve_load.py")
    pool = load["request_pool"](tiny_run, 16)
    result = load["measure"]({"torch": tiny_run}, pool, clients=(1, 8), requests=50, seconds=60, progress=quiet)
    rows = result["rows"]
    assert [(r["runtime"], r["batching"], r["clients"]) for r in rows] == [
        ("torch", True, 1), ("torch", True, 8), ("torch", False, 1), ("torch", False, 8)]
    for r in rows:
        assert r["served_by"] == "torch" and r["requests"] == 50 and r["errors"] == 0 and not r["capped"]
        assert r["requests_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["peak_rss_mib"] > 0
        assert r["server_cpu_ms"] >= r["loop_cpu_ms"] > 0 and r["client_cpu_ms"] > 0
    assert [r["mean_batch"] for r in rows if not r["batching"]] == [1.0, 1.0]  # --no-batching: one image a pass
    assert result["ratios"] == {"torch": pytest.approx(rows[1]["requests_s"] / rows[3]["requests_s"], abs=0.01)}
    assert all(r["round_requests_s"] == [r["requests_s"]] for r in rows) and result["rounds"] == 1
    machine = fingerprint()
    text = load["table"](result, machine)
    assert "batching / no batching at 8 clients" in text and machine["kind"] in text
    path = write_record(make_record(result, "serve-load", "python benchmarks/serve_load.py RUN", machine=machine),
                        tmp_path)
    assert path.name.endswith(f"-{machine['kind']}-serve-load-nin28.json")
    rendered = script("render_performance.py")["render"](load_records(tmp_path))
    assert "### Serving: `nin serve`" in rendered and "| torch | off | 8 |" in rendered


def test_rounds_give_each_figure_its_median_and_each_rounds_ratio():
    """--rounds: the whole table measured several times (here canned, no server); each figure of a row is its
    median over the rounds, errors add up, and each round's batching ratio is kept and printed."""
    load = script("serve_load.py")
    canned = iter([[1000.0, 400.0], [1300.0, 420.0], [900.0, 450.0]])  # (batching, no batching) req/s per round

    def one_round(targets, pool, clients, requests, seconds, threads, progress):
        on, off = next(canned)
        point = {"clients": 32, "requests": requests, "seconds": 1.0, "p50_ms": 10.0, "p99_ms": on / 100,
                 "errors": 1, "capped": False, "peak_rss_mib": 100.0, "mean_batch": 8.0, "forward_ms": 0.2,
                 "server_cpu_ms": 0.5, "loop_cpu_ms": 0.3, "client_cpu_ms": 0.1, "runtime": "torch",
                 "served_by": "torch"}
        return [{**point, "batching": True, "requests_s": on}, {**point, "batching": False, "requests_s": off}], "m"

    load["measure"].__globals__["_measure_round"] = one_round  # (run_path returns a copy of the script's globals)
    result = load["measure"]({"torch": None}, [], clients=(32,), requests=10, rounds=3, progress=quiet)
    on, off = result["rows"]
    assert on["requests_s"] == 1000.0 and off["requests_s"] == 420.0 and on["p99_ms"] == 10.0
    assert on["round_requests_s"] == [1000.0, 1300.0, 900.0] and on["errors"] == 3
    assert result["ratios"] == {"torch": round(1000 / 420, 2)}
    assert result["round_ratios"] == {"torch": [2.5, round(1300 / 420, 2), 2.0]}
    text = load["table"](result, {"kind": "cpu-test"})
    assert "2.38x requests/s (median of 3 rounds: 2.50x, 3.10x, 2.00x)" in text
    from nin.analysis.records import make_record

    rendered = script("render_performance.py")["render"](
        [{**make_record(result, "serve-load", "python benchmarks/serve_load.py RUN", machine={"kind": "cpu-test"}),
          "file": "r.json"}])
    assert "the median of 3 rounds" in rendered and "rounds: 2.50x, 3.10x, 2.00x" in rendered
