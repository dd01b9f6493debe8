"""Load benchmark of ``nin serve``: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with dynamic
batching on and off (``--no-batching``), for a trained run in PyTorch AND for its ONNX export, in one run.

    python benchmarks/serve_load.py RUN [--requests 2000] [--seconds 60] [--record DIR]
    python benchmarks/serve_load.py                  # trains a short nin28 run first (1 epoch, 4,096 images)

Each point is one real ``nin serve`` process (127.0.0.1, a free port; one at a time) and a client process of
its own (benchmarks/serve_harness.py: asyncio streams, one keep-alive HTTP/1.1 connection per client, each
request prebuilt as bytes) sending POST /v1/predict with one real test image as a raw ``image/png`` body, until
``--requests`` answers or ``--seconds`` have passed; a few requests per client warm the server up first, untimed.
Every answer but a 200 is an error. The ONNX file is ``nin export RUN --format onnx --out FILE`` (``--onnx``,
default RUN/serve-load.onnx), made if missing.

Besides requests/s and latency, each point says where the time went: the server's peak RSS (VmHWM of its
/proc/PID/status), images per forward pass and forward-pass (wall) time per request (the server's /metrics),
and CPU time per request of the server (all threads, and its main thread alone: the event loop, which parses
HTTP and runs FastAPI and the JSON; the rest is decoding and the forward pass) and of the client process.

The issue's target (read it on a quiet machine): on a 2-core CPU at 32 clients, batching gives at least 3x the
requests/s of --no-batching for nin28, with p99 at most 50 ms. Nothing here is pass/fail: it prints the table,
the ratio at 32 clients for each runtime and the machine kind (``nin doctor``); ``--record DIR`` keeps the result
as a JSON record (``nin.analysis.records``, kind ``serve-load``) that benchmarks/render_performance.py renders.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from serve_harness import Server, encode, metric_sums, percentile, raw_request, run_client, test_images  # noqa: E402

CLIENTS = (1, 8, 32)
RUNTIMES = ("torch", "onnx")
TARGET = {"clients": 32, "ratio": 3.0, "p99_ms": 50.0}
POOL = 256  # distinct test images the requests cycle through
MIB = 2**20


def train_short_run(out: Path) -> Path:
    """``nin train --epochs 1 --subset 4096 --out OUT``: a nin28 run of the default recipe, quickly."""
    print(f"no run given: training a short one in {out} (nin train --epochs 1 --subset 4096)", flush=True)
    subprocess.run([sys.executable, "-m", "nin", "train", "--epochs", "1", "--subset", "4096", "--quiet",
                    "--out", str(out)], check=True, timeout=3600)
    return out


def ensure_onnx(run: Path, onnx: Path) -> Path:
    """``onnx`` (and its sidecar ``onnx.json``), exported from ``run`` by ``nin export`` unless both exist."""
    if not (onnx.is_file() and onnx.with_name(onnx.name + ".json").is_file()):
        print(f"exporting {run} to {onnx} (nin export --format onnx)", flush=True)
        subprocess.run([sys.executable, "-m", "nin", "export", str(run), "--format", "onnx", "--out", str(onnx),
                        "--force"], check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return onnx


def request_pool(run: Path, n: int = POOL) -> list[bytes]:
    """POST /v1/predict requests, each one real test image as a raw image/png body."""
    return [raw_request("/v1/predict", encode(img), "image/png") for img in test_images(run, n)]


def _server_counters(server: Server) -> dict[str, float]:
    status, body = server.get("/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    sums = metric_sums(body.decode(), "nin_batch_images_sum", "nin_batch_images_count", "nin_forward_seconds_sum")
    return {**sums, "cpu": server.cpu_seconds(), "loop": server.cpu_seconds(main_thread=True)}


def measure_point(server: Server, pool: list[bytes], clients: int, count: int, seconds: float) -> dict[str, Any]:
    """``count`` requests (at most ``seconds``) from ``clients`` connections at once, after an untimed warm-up."""
    warm = [i % len(pool) for i in range(max(20, 2 * clients))]
    run_client(server.port, pool, warm, clients=clients, seconds=seconds)
    before = _server_counters(server)
    got = run_client(server.port, pool, [i % len(pool) for i in range(count)], clients=clients, seconds=seconds)
    after = _server_counters(server)
    answers = got["answers"]
    ok = [seconds for _, status, seconds, _ in answers if status == 200]
    n = max(len(answers), 1)
    images = after["nin_batch_images_sum"] - before["nin_batch_images_sum"]
    passes = after["nin_batch_images_count"] - before["nin_batch_images_count"]
    return {"clients": clients, "requests": len(answers), "seconds": round(got["elapsed"], 3),
            "requests_s": round(len(ok) / got["elapsed"], 1) if got["elapsed"] > 0 else 0.0,
            "p50_ms": round(percentile(ok, 0.50) * 1000, 2), "p99_ms": round(percentile(ok, 0.99) * 1000, 2),
            "errors": len(answers) - len(ok), "capped": len(answers) < count,
            "peak_rss_mib": round(server.status()["VmHWM"] / MIB, 1),
            "mean_batch": round(images / passes, 2) if passes else None,
            "forward_ms": round((after["nin_forward_seconds_sum"] - before["nin_forward_seconds_sum"]) * 1000 / n, 3),
            "server_cpu_ms": round((after["cpu"] - before["cpu"]) * 1000 / n, 3),
            "loop_cpu_ms": round((after["loop"] - before["loop"]) * 1000 / n, 3),
            "client_cpu_ms": round(got["cpu"] * 1000 / n, 3)}


def measure(targets: dict[str, Path], pool: list[bytes], *, clients=CLIENTS, requests: int = 2000,
            seconds: float = 60.0, threads: int | None = None, rounds: int = 1, progress=print) -> dict[str, Any]:
    """Every point of the table, ``rounds`` times over (whole rounds, one after another, so that a slow spell
    of the machine touches every point alike); each figure of a row is its median over the rounds, and
    ``round_requests_s`` keeps each round's requests/s."""
    runs = [_measure_round(targets, pool, clients, requests, seconds, threads, progress) for _ in range(rounds)]
    model = runs[0][1]
    rows = [_median_row([r[0][i] for r in runs]) for i in range(len(runs[0][0]))]
    per_round = [ratios(r[0], max(clients)) for r in runs]
    return {"model": model, "requests": requests, "seconds": seconds, "clients": list(clients),
            "threads": threads, "rounds": rounds, "rows": rows, "ratios": ratios(rows, max(clients)),
            "round_ratios": {k: [r[k] for r in per_round] for k in per_round[0]}, "target": TARGET}


def _median_row(points: list[dict]) -> dict:
    """One point measured in several rounds: the median of each figure, and every round's requests/s."""
    row = dict(points[0])
    for key, value in points[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "clients":
            values = [p[key] for p in points if p[key] is not None]
            row[key] = statistics.median(values) if values else None
    row["errors"] = sum(p["errors"] for p in points)
    row["capped"] = any(p["capped"] for p in points)
    row["round_requests_s"] = [p["requests_s"] for p in points]
    return row


def _measure_round(targets, pool, clients, requests, seconds, threads, progress) -> tuple[list[dict], str]:
    rows, model = [], None
    for runtime, path in targets.items():
        for batching in (True, False):
            flags = ["--batching" if batching else "--no-batching", *(["--threads", str(threads)] if threads else [])]
            with Server(path, *flags) as server:
                card = json.loads(server.get("/v1/model")[1])
                model = model or card["name"]
                for c in clients:
                    row = {"runtime": runtime, "served_by": card["runtime"], "batching": batching,
                           **measure_point(server, pool, c, requests, seconds)}
                    progress(_line(row))
                    rows.append(row)
                exit_code = server.stop()
            if exit_code != 0:
                raise RuntimeError(f"nin serve {path} exited {exit_code} on SIGTERM: {server.stderr()[-2000:]}")
    return rows, model


def ratios(rows: list[dict], clients: int) -> dict[str, float | None]:
    """requests/s with batching over requests/s without, at ``clients``, for each runtime."""
    rate = {(r["runtime"], r["batching"]): r["requests_s"] for r in rows if r["clients"] == clients}
    out = {}
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        on, off = rate.get((runtime, True)), rate.get((runtime, False))
        out[runtime] = round(on / off, 2) if on is not None and off else None
    return out


HEADER = ("runtime", "batching", "clients", "req/s", "p50 ms", "p99 ms", "errors", "peak RSS MiB", "img/pass",
          "fwd ms/req", "srv CPU ms/req", "loop CPU ms/req", "client CPU ms/req")


def _cells(r: dict) -> tuple:
    return (r["runtime"], "on" if r["batching"] else "off", r["clients"],
            f"{r['requests_s']:,.1f}" + ("*" if r["capped"] else ""), f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            r["errors"], f"{r['peak_rss_mib']:.0f}", "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}",
            f"{r['forward_ms']:.2f}", f"{r['server_cpu_ms']:.2f}", f"{r['loop_cpu_ms']:.2f}",
            f"{r['client_cpu_ms']:.2f}")


def _line(r: dict) -> str:
    return "  ".join(f"{h}={v}" for h, v in zip(HEADER, _cells(r)))


def table(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """The table, the ratios at the most clients, the target, and the machine kind, as printed."""
    cells = [HEADER, *(tuple(str(v) for v in _cells(r)) for r in result["rows"])]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    if any(r["capped"] for r in result["rows"]):
        lines.append(f"* stopped by the time cap ({result['seconds']:g} s) before {result['requests']} requests")
    top = max(result["clients"])
    t = result["target"]
    for runtime, ratio in result["ratios"].items():
        p99 = next((r["p99_ms"] for r in result["rows"]
                    if (r["runtime"], r["batching"], r["clients"]) == (runtime, True, top)), None)
        if ratio is None:
            continue
        verdict = ""
        if top == t["clients"]:
            met = ratio >= t["ratio"] and p99 is not None and p99 <= t["p99_ms"]
            verdict = (f"; target {t['ratio']:g}x with p99 <= {t['p99_ms']:g} ms: "
                       f"{'met' if met else 'NOT met'}")
        each = result.get("round_ratios", {}).get(runtime) or []
        rounds = f" (median of {len(each)} rounds: {', '.join(f'{x:.2f}x' for x in each)})" if len(each) > 1 else ""
        lines.append(f"{runtime}: batching / no batching at {top} clients: {ratio:.2f}x requests/s{rounds}, "
                     f"p99 {p99:.1f} ms with batching{verdict}")
    lines.append(f"model {result['model']}; machine {machine.get('kind')} ({machine.get('label')}; "
                 f"{machine.get('cpu')}, {machine.get('usable_cpus')} usable CPUs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", type=Path, help="trained run directory (default: train a short nin28 run)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per point (default 2,000)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap per point (default 60)")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="concurrent clients (default 1,8,32)")
    ap.add_argument("--runtime", choices=("both", *RUNTIMES), default="both", help="torch, onnx or both (default)")
    ap.add_argument("--onnx", type=Path, help="the ONNX export (default RUN/serve-load.onnx; made if missing)")
    ap.add_argument("--threads", type=int, help="the server's --threads (default: the runtime's)")
    ap.add_argument("--rounds", type=int, default=3, help="measure the whole table this many times; each figure "
                                                          "is the median over the rounds (default 3)")
    ap.add_argument("--record", type=Path, help="keep the result as a JSON record in this folder")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
        ap.error("--requests, --seconds and --rounds must be positive")
    clients = tuple(int(c) for c in args.clients.split(","))
    from nin.analysis.doctor import fingerprint

    machine = fingerprint()
    with tempfile.TemporaryDirectory(prefix="nin-serve-load-") as tmp:
        run = args.run or train_short_run(Path(tmp) / "run")
        targets = {}
        if args.runtime in ("both", "torch"):
            targets["torch"] = run
        if args.runtime in ("both", "onnx"):
            targets["onnx"] = ensure_onnx(run, args.onnx or run / "serve-load.onnx")
        result = measure(targets, request_pool(run), clients=clients, requests=args.requests,
                         seconds=args.seconds, threads=args.threads, rounds=args.rounds)
    print(table(result, machine))
    if args.record:
        from nin.analysis.records import make_record, write_record

        command = shlex.join(["python", "benchmarks/serve_load.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"record: {write_record(make_record(result, 'serve-load', command, machine=machine), args.record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
