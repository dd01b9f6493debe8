"""``nin doctor``'s report as text: one section per part of :func:`nin.analysis.doctor.collect`'s document."""

from __future__ import annotations

import textwrap
from typing import Any


def _row(label: str, value: object) -> str:
    return f"  {label:<16}{value}"


def _on(value: object) -> str:
    if value is None:
        return "-"
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _machine_lines(m: dict[str, Any]) -> list[str]:
    mem = m["memory"]
    gib = lambda v: "?" if v is None else f"{v:,.1f} GiB"  # noqa: E731
    limit = f"cgroup limit {gib(mem['cgroup_limit_gib'])}" if mem["cgroup_limit_gib"] else "no cgroup limit"
    return [_row("cpu", f"{m['model']} ({', '.join(filter(None, (m['vendor'], m['arch'])))})"),
            _row("features", " ".join(m["features"]) or "none of those that matter"),
            _row("cpus", f"{m['logical_cpus']} logical, {m['usable_cpus']} usable by this process; nin computes "
                         f"on {m['threads']} thread{'s' if m['threads'] != 1 else ''}"),
            _row("memory", f"{gib(mem['total_gib'])} total, {gib(mem['available_gib'])} available, {limit}"),
            _row("os", m["os"])]


def _software_lines(s: dict[str, Any]) -> list[str]:
    dash = lambda v: v or "-"  # noqa: E731
    extras = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in s["extras"].items())
    return [_row("python", s["python"]), _row("nin", dash(s["nin"])),
            _row("torch", f"{s['torch']} (CPU kernels: {s['cpu_capability']})"), _row("oneDNN", dash(s["onednn"])),
            _row("MKL", dash(s["mkl"])), _row("OpenMP", dash(s["openmp"])),
            _row("CUDA", s["cuda"] or "none (a CPU-only build of torch)"), _row("cuDNN", dash(s["cudnn"])),
            _row("NCCL", dash(s["nccl"])), _row("numpy", dash(s["numpy"])), _row("extras", extras)]


def _gpu_lines(gpus: list[dict[str, Any]]) -> list[str]:
    if not gpus:
        return ["  none: torch sees no CUDA GPU"]
    lines = []
    for g in gpus:
        has = [name for name, key in (("native bf16", "bf16_native"), ("TF32", "tf32"),
                                      ("fp16 tensor cores", "fp16_tensor_cores")) if g[key]]
        lines.append(_row(f"cuda:{g['index']}", f"{g['name']}: {g['memory_gib']} GiB, compute capability "
                                                f"{g['compute_capability']}, {g['multiprocessors']} SMs; "
                                                f"{', '.join(has) or 'no tensor cores'}"))
    return lines


def _defaults_lines(d: dict[str, Any]) -> list[str]:
    lines = []
    for key, entry in d.items():
        value = _on(entry["value"])
        if key == "amp" and entry.get("grad_scaler"):
            value += " + grad scaler"
        start = _row(key, f"{value:<18}  ")
        lines += textwrap.wrap(entry["reason"], 120, initial_indent=start, subsequent_indent=" " * len(start))
    return lines


def _measurement_lines(m: dict[str, Any] | None) -> list[str]:
    if m is None:
        return ["  skipped (--no-measure)"]
    threads = f", {m['threads']} threads" if m["threads"] else ""
    fp32 = m["matmul_gflops"]["fp32"]
    lines = [f"  square matmul peak on {m['device']}{threads}; took {m['seconds']:.1f} s"]
    for name, g in m["matmul_gflops"].items():
        ratio = f" ({g / fp32:.2g}x fp32)" if name != "fp32" and fp32 else ""
        lines.append(_row(name, f"{g:,.1f} GFLOP/s{ratio}"))
    return lines


def _dataset_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [_row(r["name"], f"{r['shape']}, {r['classes']} classes: " +
                 ("not found" if r["found"] == "not found" else f"{r['found']}; checksum {r['checksum']}"))
            for r in rows]


def render(report: dict[str, Any]) -> str:
    """The report as text: one titled block per section, readable top to bottom."""
    kind = report["kind"]
    blocks = [("Machine", _machine_lines(report["machine"])),
              ("Machine kind", [_row(kind["slug"], kind["label"])]),
              ("Software", _software_lines(report["software"])),
              ("GPUs", _gpu_lines(report["gpus"])),
              ("What nin will do here (nin train's defaults)", _defaults_lines(report["defaults"])),
              ("Measurements", _measurement_lines(report["measurements"])),
              ("Data sets (nin datasets)", _dataset_lines(report["datasets"]))]
    return "\n\n".join("\n".join([title, *lines]) for title, lines in blocks) + "\n"
