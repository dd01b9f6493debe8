"""Render docs/performance.md from the benchmark records in benchmarks/results/.

    python benchmarks/render_performance.py            # write docs/performance.md
    python benchmarks/render_performance.py --check    # exit 1 if the file is not what the records give

Each record is one ``nin bench --record`` run (see ``nin.analysis.records``) and names its machine by
``nin doctor``'s fingerprint. The page has one section per machine kind, with that kind's latest
record of each sort: ``nin_d2l`` at 224 against the seed's way, the speed switches of ``nin28``, and
time to accuracy of the default recipe. Every ceiling is the record's own matmul peak divided by
the model's FLOPs per image, so a figure never borrows another machine's hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from nin.analysis.records import load_records  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
ORDER = ("cuda", "cpu-amx", "cpu-avx512-bf16", "cpu-avx512", "cpu-avx2")  # GPUs first, then faster CPUs


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _kind_rank(kind: str) -> int:
    return next((i for i, k in enumerate(ORDER) if kind.startswith(k)), len(ORDER))


def _source(rec: dict[str, Any]) -> str:
    note = f" {rec['source']}" if rec.get("source") else ""
    return f"`{rec['command']}`, {rec['recorded'][:10]} ([record](../benchmarks/results/{rec['file']})).{note}"


def _case_table(rec: dict[str, Any], ratio_to_first: bool) -> list[str]:
    r = rec["result"]
    rows = ["| case | dtype | train img/s | inference img/s | batch-1 latency | train MFU | inference MFU "
            "| peak memory train / inference (GiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    first = r["cases"][0]
    for c in r["cases"]:
        name = c["name"]
        if ratio_to_first and c is not first:
            name += f" ({c['train_img_s'] / first['train_img_s']:.2f}x, {c['infer_img_s'] / first['infer_img_s']:.2f}x)"
        rows.append(f"| {name} | {c['dtype']} | {_num(c['train_img_s'])} | {_num(c['infer_img_s'])} | "
                    f"{_num(c['latency_ms'])} ms | {_pct(c.get('train_mfu'))} | {_pct(c.get('infer_mfu'))} | "
                    f"{_gib(c.get('train_peak_bytes'))} / {_gib(c.get('infer_peak_bytes'))} |")
    return rows


def _ceilings(rec: dict[str, Any]) -> list[str]:
    r = rec["result"]
    peaks = r["peak_flop_s"]
    lines = ["Matmul peak measured in the same process: " +
             ", ".join(f"{k} **{v / 1e9:,.1f} GFLOP/s**" for k, v in peaks.items()) + "."]
    for dtype in sorted({c["dtype"] for c in r["cases"]}, key=list(peaks).index):
        peak = peaks[dtype]
        lines.append(f"At the {dtype} peak, {r['model']} ({r['flops_train_step'] / 1e9:.3f} GFLOP per training "
                     f"image, {r['flops_forward'] / 1e9:.3f} per inference) cannot train faster than "
                     f"**{peak / r['flops_train_step']:,.1f} img/s** or infer faster than "
                     f"**{peak / r['flops_forward']:,.1f} img/s** here.")
    return lines


def _headline(rec: dict[str, Any]) -> list[str]:
    r = rec["result"]
    out = [f"### `{r['model']}` at {r['input']}, batch {r['batch_size']}: our path and the seed's way", "",
           *_case_table(rec, ratio_to_first=False)]
    cases = {c["name"]: c for c in r["cases"]}
    if "nin" in cases and "seed's way" in cases:
        ours, seed = cases["nin"], cases["seed's way"]
        out.append(f"| speed-up | | {ours['train_img_s'] / seed['train_img_s']:.2f}x | "
                   f"{ours['infer_img_s'] / seed['infer_img_s']:.2f}x | "
                   f"{seed['latency_ms'] / ours['latency_ms']:.2f}x | | | |")
    return [*out, "", *_ceilings(rec), "", _source(rec), ""]


def _ablation(rec: dict[str, Any]) -> list[str]:
    r = rec["result"]
    return [f"### Speed switches: `{r['model']}` at {r['input']}, batch {r['batch_size']}", "",
            "Each row flips one switch of the fast path (first row); in brackets the train and inference "
            "ratios to the fast path, timed in the same process.", "",
            *_case_table(rec, ratio_to_first=True), "", _source(rec), ""]


def _tta(records: list[dict[str, Any]]) -> list[str]:
    rows = ["### Time to accuracy, data loading included", "",
            "The clock starts when the process starts; test accuracy is on all 10,000 test images after each epoch.",
            "", "| recipe | epochs | 91% reached | 93% reached | final test accuracy | whole run | record |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec in sorted(records, key=lambda x: x["result"]["config"]["train"]["epochs"]):
        r = rec["result"]
        hits = []
        for t in ("0.91", "0.93"):
            hit = r["targets"].get(t)
            hits.append(f"{hit['seconds']:.1f} s (epoch {hit['epoch']})" if hit else "no")
        final = r["epochs"][-1]["test_acc"] if r["epochs"] else None
        cfg = r["config"]
        recipe = r.get("preset") or cfg.get("preset") or cfg["model"]["name"]
        rows.append(f"| `{recipe}` | {cfg['train']['epochs']} | {hits[0]} | "
                    f"{hits[1]} | {_num(final, 4)} | {r['seconds']:.1f} s | "
                    f"[{rec['recorded'][:10]}](../benchmarks/results/{rec['file']}) |")
    notes = sorted({rec["source"] for rec in records if rec.get("source")})
    return [*rows, "", *notes, *([""] if notes else [])]


def _machine(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    gpus = f"; GPUs: {', '.join(m['gpus'])}" if m.get("gpus") else ""
    return (f"**Machine:** {m.get('cpu', '?')}, {m.get('usable_cpus', '?')} usable CPUs, "
            f"{_num(m.get('memory_gib'))} GiB; features: {' '.join(m.get('features') or []) or '-'}{gpus}. "
            f"**Software:** torch {m.get('torch', '?')}, oneDNN {m.get('onednn') or '-'}"
            f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}, Python {m.get('python', '?')}.")


def _stress(kind: str) -> list[str]:
    lines = []
    for path in sorted(RESULTS.glob(f"torchrun-stress-{kind}-*.json")):
        s = json.loads(path.read_text())
        runs = s.get("runs", [])
        ok = sum(1 for x in runs if x.get("exit") == 0)
        load = " --load" if s.get("load") else ""
        code = "the code before the exit fix" if "before-fix" in path.name else "the fixed code"
        link = f"[record](../benchmarks/results/{path.name})"
        lines.append(f"- `bash benchmarks/torchrun_stress.sh{load}` on {code}: **{ok} of {len(runs)}** 2-process "
                     f"torchrun runs exited 0 ({s.get('date', '?')[:10]}, {link}).")
    return ["### torchrun stress", "", *lines, ""] if lines else []


def _default_recipe(rec: dict[str, Any]) -> bool:
    """A time-to-accuracy record of the default recipe at seed 0 on the test set (other recipes, seeds and
    validation runs are docs/accuracy.md's)."""
    if rec["what"] != "time-to-accuracy":
        return False
    r, cfg = rec["result"], rec["result"]["config"]
    return (r.get("preset") or "default") == "default" and cfg.get("seed", 0) == 0 \
        and not (cfg.get("data") or {}).get("holdout") and not rec.get("source", "").startswith("Converted")


def _serving(records: list[dict[str, Any]]) -> list[str]:
    """The latest ``nin serve`` load benchmark and soak test (benchmarks/serve_load.py, serve_soak.py)."""
    load = [r for r in records if r["what"] == "serve-load"]
    soak = [r for r in records if r["what"] == "serve-soak"]
    if not load and not soak:
        return []
    out = ["### Serving: `nin serve`", ""]
    if load:
        rec = load[-1]
        r = rec["result"]
        out += [f"POST /v1/predict, one real test image as a PNG body per request, from 1 to {max(r['clients'])} "
                f"keep-alive clients in a process of their own on the same CPUs; {r['requests']:,} requests per "
                f"point (at most {r['seconds']:g} s); model `{r['model']}`.", "",
                "| runtime | batching | clients | requests/s | p50 | p99 | errors | peak RSS (MiB) | images per pass |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["rows"]:
            out.append(f"| {row['runtime']} | {'on' if row['batching'] else 'off'} | {row['clients']} | "
                       f"{_num(row['requests_s'])} | {_num(row['p50_ms'])} ms | {_num(row['p99_ms'])} ms | "
                       f"{row['errors']} | {_num(row['peak_rss_mib'], 0)} | {_num(row['mean_batch'])} |")
        rounds = r.get("rounds", 1)
        each = r.get("round_ratios", {})
        ratios = ", ".join(f"{k} **{v:.2f}x**" + (f" (rounds: {', '.join(f'{x:.2f}x' for x in each[k])})"
                                                 if len(each.get(k) or []) > 1 else "")
                           for k, v in r["ratios"].items() if v is not None)
        medians = f" Each figure is the median of {rounds} rounds of the whole table." if rounds > 1 else ""
        out += ["", f"Batching over `--no-batching` at {max(r['clients'])} clients, requests/s: {ratios}.{medians}",
                "", _source(rec), ""]
    if soak:
        rec = soak[-1]
        r = rec["result"]
        verdict = "**passed**" if r["passed"] else f"**failed** ({r['failures'][0]})"
        out += [f"Soak: {r['requests']:,} mixed requests (good, malformed, oversized, wrong type, decompression "
                f"bombs) from {r['clients']} clients: {verdict}; RSS +{r['rss_growth_mib']:.1f} MiB after a "
                f"{r['warmup']}-request warm-up (bound {r['rss_bound_mib']:g} MiB). {_source(rec)}", ""]
    return out


def _section(kind: str, records: list[dict[str, Any]]) -> list[str]:
    label = records[-1]["machine"].get("label", kind)
    speed = [r for r in records if r["what"] == "speed"]
    headline = [r for r in speed if r["result"]["model"] == "nin_d2l" and
                any(c["name"] == "seed's way" for c in r["result"]["cases"])]
    ablations = [r for r in speed if len(r["result"]["cases"]) > 2 and r["result"]["model"] != "nin_d2l"]
    tta = {r["result"]["config"]["train"]["epochs"]: r for r in records if _default_recipe(r)}
    out = [f"## {label} (`{kind}`)", "", _machine(records[-1]), ""]
    if headline:
        out += _headline(headline[-1])
    if ablations:
        out += _ablation(ablations[-1])
    if tta:
        out += _tta(list(tta.values()))
    out += _stress(kind)
    out += _serving(records)
    return out


INTRO = """# Performance

Generated by `python benchmarks/render_performance.py` from the records in
[`benchmarks/results/`](../benchmarks/results/); do not edit by hand. Each record is one
`nin bench --record benchmarks/results` run and names its machine by `nin doctor`'s fingerprint;
`bash benchmarks/performance.sh` makes a full set on the machine it runs on, and
`bash benchmarks/gpu.sh` the set for an NVIDIA GPU.

How to read the tables:

- **Train img/s** goes through the real trainer and loader: uint8 images on the device, resized,
  augmented and normalized per batch there, fused SGD step. **Inference** is eval mode without
  autograd, BatchNorm folded. **Batch-1 latency** is one uint8 image to a class index on the host.
- **The seed's way** (`nin.analysis.seed_way`) is the chapter's code path: a plain `nn.Sequential`, fp32 in
  NCHW, a PIL resize of each image in a `DataLoader` with 4 workers, metrics read back every batch.
- **MFU** (model FLOPs utilization) is the model's FLOP/s (`nin.analysis.profile.count_flops`: a
  `nin_d2l` training step is 4.506 GFLOP per image, a forward pass 1.525) over the peak of a
  square matmul measured in the same process in the case's dtype. A ceiling is that peak over the
  FLOPs per image: no implementation trains faster on that machine.
- Timings are medians of several timed blocks. The machines are shared, so absolute figures move by
  10-30% between runs; ratios inside one record are the comparisons to trust.

Machine kinds come from CPU features, not model names (`nin doctor` prints the kind): `cpu-avx2`
has no native bf16, so `--amp auto` trains in fp32 there and bf16 is emulated (slow);
`cpu-avx512-bf16` and `cpu-amx` run bf16 natively, so `auto` trains in bf16; on a GPU `auto` takes
bf16 from compute capability 8.0 and fp16 with a gradient scaler below it (a T4).
"""


def render(records: list[dict[str, Any]]) -> str:
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_kind[rec["machine"].get("kind", "unknown")].append(rec)
    kinds = sorted(by_kind, key=lambda k: (_kind_rank(k), k))
    index = ["| machine kind | what it is | records | dates |", "| --- | --- | --- | --- |"]
    for k in kinds:
        recs = by_kind[k]
        index.append(f"| [`{k}`](#{k}) | {recs[-1]['machine'].get('label', k)} | {len(recs)} | "
                     f"{recs[0]['recorded'][:10]} to {recs[-1]['recorded'][:10]} |")
    body = [INTRO, "## Machine kinds measured", "", *index, ""]
    if not any(k.startswith("cuda") for k in kinds):
        body += ["No record from a GPU yet: no GPU has been lent to this project so far. "
                 "`bash benchmarks/gpu.sh` makes the records in one run.", ""]
    for k in kinds:
        body += [f'<a id="{k}"></a>', "", *_section(k, by_kind[k])]
    return "\n".join(body).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md is out of date")
    args = ap.parse_args()
    text = render(load_records(RESULTS))
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} is not what {RESULTS} renders: run python benchmarks/render_performance.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)} from {len(load_records(RESULTS))} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
