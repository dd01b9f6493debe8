"""Soak test of ``nin serve``: one server, 10,000 mixed requests (good images, malformed, oversized, a wrong content
type, decompression bombs) from a few concurrent clients; every answer checked, memory growth bounded.

    python benchmarks/serve_soak.py RUN [--requests 10000] [--clients 4] [--record DIR]

The server is ``nin serve RUN --max-bytes 200000 --max-pixels 1000000 --max-images 8`` on 127.0.0.1 (a free
port). The requests, prebuilt from real test images (nin.data, written by Pillow) and sent by the light client
of benchmarks/serve_harness.py, are:

* good (200): a PNG or JPEG as the raw body (``image/png``, ``image/jpeg``, ``application/octet-stream``), and
  multipart bodies of 2-4 such files;
* bad (400): random bytes, a truncated PNG, an empty body, a PNG of 4,000 x 4,000 black pixels (16 kB: a
  decompression bomb over --max-pixels) and one whose header alone declares 100,000 x 100,000, 9 files (over
  --max-images), ``?top_k=0``; 413: 300 kB (over --max-bytes) with a Content-Length, and chunked without one;
  415: ``text/plain``.

It fails (exit 1) unless: no answer is a 5xx or missing; each bad request gets its own status with a JSON body
``{"error": "..."}``; every good answer equals ``nin predict RUN FILES --json --top-k 3`` (run once over all the
distinct good files) for each of its files: the same classes in the same order, probabilities within 1e-5;
the server's RSS after the soak is at most ``--rss-bound`` MiB (default 64) above its RSS after a warm-up of 500
requests; its own /metrics count no 5xx; no traceback in its log; it exits 0 on SIGTERM. Every kind of request is
sent at least once.
``--record DIR`` keeps the result as a JSON record (``nin.analysis.records``, kind ``serve-soak``).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from serve_harness import Server, encode, multipart, raw_request, run_client, test_images  # noqa: E402

MAX_BYTES, MAX_PIXELS, MAX_IMAGES = 200_000, 1_000_000, 8
FLAGS = ("--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS), "--max-images", str(MAX_IMAGES))
TOP_K = 3
TOLERANCE = 1e-5
MIB = 2**20
# kind: (expected status, share of the requests in percent)
KINDS = {"png": (200, 30), "jpeg": (200, 12), "octet-stream": (200, 5), "multipart": (200, 13),
         "random-bytes": (400, 6), "truncated-png": (400, 6), "empty": (400, 4), "bomb": (400, 5),
         "too-many-images": (400, 3), "bad-top-k": (400, 3), "oversized": (413, 4), "oversized-chunked": (413, 3),
         "text-plain": (415, 6)}
PREDICT = f"/v1/predict?top_k={TOP_K}"


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring ``width`` x ``height`` pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def real_bomb(side: int = 4000) -> bytes:
    """A real PNG of ``side`` x ``side`` black pixels: 16 kB on the wire, 16 MB decoded."""
    import numpy as np

    return encode(np.zeros((1, side, side), np.uint8))


def build_requests(run: Path, folder: Path, seed: int = 0) -> tuple[list[dict], list[Path]]:
    """The request templates (``{"kind", "expect", "files", "request"}``) and the distinct good files (written
    in ``folder``); ``files`` names each good file a template sends, in order ("body" parts keep their name)."""
    rng = random.Random(seed)
    images = test_images(run, 64)
    good: dict[str, bytes] = {}
    for i, img in enumerate(images):
        name = f"test{i:03d}.png" if i < 48 else f"test{i:03d}.jpg"
        good[name] = encode(img, "PNG" if name.endswith(".png") else "JPEG")
        (folder / name).write_bytes(good[name])
    pngs, jpegs = [n for n in good if n.endswith(".png")], [n for n in good if n.endswith(".jpg")]
    kind_of = {".png": "image/png", ".jpg": "image/jpeg"}
    t: list[dict] = []

    def add(kind: str, request: bytes, files=()) -> None:
        t.append({"kind": kind, "expect": KINDS[kind][0], "files": list(files), "request": request})

    for n in pngs:
        add("png", raw_request(PREDICT, good[n], "image/png"), [n])
    for n in jpegs:
        add("jpeg", raw_request(PREDICT, good[n], "image/jpeg"), [n])
    for n in pngs[:8] + jpegs[:4]:
        add("octet-stream", raw_request(PREDICT, good[n], "application/octet-stream"), [n])
    for _ in range(32):
        names = rng.sample(list(good), rng.randint(2, 4))
        body, ctype = multipart([(n, good[n], kind_of[n[-4:]]) for n in names])
        add("multipart", raw_request(PREDICT, body, ctype), names)
    for size in (1, 7, 100, 999, 5000):
        add("random-bytes", raw_request(PREDICT, rng.randbytes(size), "image/png"))
    for n, cut in zip(pngs, (0.4, 0.5, 0.6, 0.7)):
        add("truncated-png", raw_request(PREDICT, good[n][:int(len(good[n]) * cut)], "image/png"))
    add("empty", raw_request(PREDICT, b"", "image/png"))
    add("bomb", raw_request(PREDICT, real_bomb(), "image/png"))
    add("bomb", raw_request(PREDICT, png_header_only(100_000, 100_000), "image/png"))
    body, ctype = multipart([(n, good[n], "image/png") for n in pngs[:MAX_IMAGES + 1]])
    add("too-many-images", raw_request(PREDICT, body, ctype))
    add("bad-top-k", raw_request("/v1/predict?top_k=0", good[pngs[0]], "image/png"))
    big = rng.randbytes(300_000)
    add("oversized", raw_request(PREDICT, big, "image/png"))
    add("oversized-chunked", raw_request(PREDICT, big, "image/png", chunked=True))
    add("text-plain", raw_request(PREDICT, b"a picture of a boot", "text/plain"))
    return t, [folder / n for n in good]


def schedule(templates: list[dict], count: int, seed: int) -> list[int]:
    """``count`` template indices: one of each kind first, then kinds drawn by their shares."""
    rng = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(templates):
        by_kind.setdefault(t["kind"], []).append(i)
    kinds = list(by_kind)
    first = [by_kind[k][0] for k in kinds][:count]
    drawn = rng.choices(kinds, weights=[KINDS[k][1] for k in kinds], k=count - len(first))
    return first + [rng.choice(by_kind[k]) for k in drawn]


def reference(run: Path, files: list[Path], timeout: float = 600) -> dict[str, list[tuple[str, float]]]:
    """``nin predict RUN FILES --json --top-k 3``, once: each file's name -> its top classes and probabilities."""
    out = subprocess.run([sys.executable, "-m", "nin", "predict", str(run), *map(str, files), "--json",
                          "--top-k", str(TOP_K)], capture_output=True, text=True, timeout=timeout, check=True)
    preds = json.loads(out.stdout)["predictions"]
    return {Path(p["file"]).name: [(t["class"], t["probability"]) for t in p["top"]] for p in preds}


def check_answer(template: dict, status: int, body: bytes, expected: dict[str, list]) -> str | None:
    """Why this answer to ``template`` is wrong, or None. ``expected``: nin predict's answers by file name."""
    if status == 0:
        return body.decode(errors="replace")
    if status >= 500:
        return f"{status} (a 5xx): {body[:200]!r}"
    if status != template["expect"]:
        return f"{status}, not {template['expect']}: {body[:200]!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} without a JSON body: {body[:200]!r}"
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        return None if isinstance(error, str) and error.strip() else f"{status} without an 'error': {body[:200]!r}"
    preds = answer.get("predictions") if isinstance(answer, dict) else None
    files = template["files"]
    if not isinstance(preds, list) or len(preds) != len(files):
        return f"{len(files)} files sent, answer: {body[:200]!r}"
    for name, pred in zip(files, preds):
        sent_as = name if template["kind"] == "multipart" else "body"
        got = [(t["class"], t["probability"]) for t in pred.get("top", [])]
        want = expected[name]
        if pred.get("file") != sent_as:
            return f"{name}: answered as {pred.get('file')!r}, not {sent_as!r}"
        if [c for c, _ in got] != [c for c, _ in want]:
            return f"{name}: classes {[c for c, _ in got]}, nin predict says {[c for c, _ in want]}"
        worst = max(abs(p - q) for (_, p), (_, q) in zip(got, want))
        if worst > TOLERANCE:
            return f"{name}: a probability {worst:.2e} away from nin predict's (tolerance {TOLERANCE:g})"
    return None


def server_errors(metrics: str) -> dict[str, float]:
    """The 5xx answers ``nin_requests_total`` counts in the server's /metrics text, by series."""
    found = {}
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("nin_requests_total{") and 'status="5' in name and float(value) > 0:
            found[name] = float(value)
    return found


def soak(run: Path, *, requests: int = 10_000, warmup: int = 500, clients: int = 4, rss_bound_mib: float = 64.0,
         seconds: float = 1800.0, seed: int = 0, progress=print) -> dict[str, Any]:
    """Run the soak against ``run``; the result holds the counts, the memory, and ``failures`` (empty: passed)."""
    with tempfile.TemporaryDirectory(prefix="nin-serve-soak-") as tmp:
        templates, files = build_requests(run, Path(tmp), seed)
        progress(f"nin predict over {len(files)} distinct good files (the reference)")
        expected = reference(run, files)
    pool = [t["request"] for t in templates]
    failures: list[str] = []
    wrong: Counter = Counter()
    sent: Counter = Counter()
    compared = 0  # images whose answer matched nin predict's

    def check(answers: list) -> None:
        nonlocal compared
        for i, status, _, body in answers:
            sent[templates[i]["kind"]] += 1
            why = check_answer(templates[i], status, body, expected)
            if not why and status == 200:
                compared += len(templates[i]["files"])
            if why:
                wrong[templates[i]["kind"]] += 1
                if len(failures) < 20:
                    failures.append(f"{templates[i]['kind']}: {why}")

    with Server(run, *FLAGS) as server:
        card = json.loads(server.get("/v1/model")[1])
        progress(f"nin serve {run} {' '.join(FLAGS)} on port {server.port}: warm-up, {warmup} requests")
        got = run_client(server.port, pool, schedule(templates, warmup, seed + 1), clients=clients,
                         seconds=seconds, bodies=True)
        check(got["answers"])
        rss_warm = server.status()["VmRSS"]
        progress(f"soak: {requests} requests from {clients} clients")
        got = run_client(server.port, pool, schedule(templates, requests, seed + 2), clients=clients,
                         seconds=seconds, bodies=True)
        check(got["answers"])
        memory = server.status()
        counted = server_errors(server.get("/metrics")[1].decode())
        exit_code = server.stop()
        log = server.stderr()
    soaked = len(got["answers"])
    if soaked < requests:
        failures.append(f"only {soaked} of {requests} requests answered within {seconds:g} s")
    growth = (memory["VmRSS"] - rss_warm) / MIB
    if growth > rss_bound_mib:
        failures.append(f"RSS grew {growth:.1f} MiB after the warm-up (bound {rss_bound_mib:g} MiB)")
    if counted:
        failures.append(f"the server's /metrics counts 5xx answers: {counted}")
    if exit_code != 0:
        failures.append(f"nin serve exited {exit_code} on SIGTERM")
    if "Traceback" in log:
        failures.append("a traceback in the server's log: " + log[log.index("Traceback"):][:1500])
    missing = [k for k in KINDS if not sent[k]]
    if missing:  # a kind never sent checks nothing
        failures.append(f"never sent: {', '.join(missing)}")
    if wrong:
        failures.insert(0, f"{sum(wrong.values())} wrong answers: " + ", ".join(f"{k} {n}" for k, n in wrong.items()))
    return {"model": card["name"], "version": card["version"], "requests": requests,
            "warmup": warmup, "clients": clients, "seconds": round(got["elapsed"], 1),
            "requests_s": round(soaked / got["elapsed"], 1) if got["elapsed"] else 0.0, "server_flags": list(FLAGS),
            "sent": dict(sent), "wrong": dict(wrong), "good_files": len(files), "compared": compared,
            "rss_after_warmup_mib": round(rss_warm / MIB, 1), "rss_after_mib": round(memory["VmRSS"] / MIB, 1),
            "rss_growth_mib": round(growth, 1), "rss_bound_mib": rss_bound_mib,
            "peak_rss_mib": round(memory["VmHWM"] / MIB, 1), "exit_code": exit_code, "failures": failures,
            "passed": not failures}


def summary(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {r['sent'].get(k, 0)} ({KINDS[k][0]})" for k in KINDS)
    lines = [f"soak of nin serve ({r['model']}): {r['requests']} requests after a {r['warmup']}-request warm-up, "
             f"{r['clients']} clients, {r['seconds']:g} s ({r['requests_s']:,.1f} requests/s)",
             f"sent, warm-up included (expected status): {kinds}",
             f"wrong answers: {sum(r['wrong'].values())}; {r['compared']:,} images answered as nin predict answers "
             f"them ({r['good_files']} distinct files; top {TOP_K}, probabilities within {TOLERANCE:g})",
             f"RSS: {r['rss_after_warmup_mib']:.1f} MiB after the warm-up, {r['rss_after_mib']:.1f} MiB after the "
             f"soak: +{r['rss_growth_mib']:.1f} MiB (bound {r['rss_bound_mib']:g} MiB); "
             f"peak {r['peak_rss_mib']:.1f} MiB",
             f"exit on SIGTERM: {r['exit_code']}",
             "PASSED" if r["passed"] else "FAILED:\n  " + "\n  ".join(r["failures"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="trained run directory")
    ap.add_argument("--requests", type=int, default=10_000, help="requests after the warm-up (default 10,000)")
    ap.add_argument("--warmup", type=int, default=500, help="warm-up requests before the first RSS (default 500)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--rss-bound", type=float, default=64.0, help="most RSS growth allowed, MiB (default 64)")
    ap.add_argument("--seconds", type=float, default=1800.0, help="time cap of the soak (default 1,800)")
    ap.add_argument("--record", type=Path, help="keep the result as a JSON record in this folder")
    args = ap.parse_args(argv)
    if min(args.requests, args.warmup, args.clients) < 1:
        ap.error("--requests, --warmup and --clients must be positive")
    result = soak(args.run, requests=args.requests, warmup=args.warmup, clients=args.clients,
                  rss_bound_mib=args.rss_bound, seconds=args.seconds)
    print(summary(result))
    if args.record:
        from nin.analysis.records import make_record, write_record

        command = shlex.join(["python", "benchmarks/serve_soak.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"record: {write_record(make_record(result, 'serve-soak', command), args.record)}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
