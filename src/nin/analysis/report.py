"""``nin profile``'s output: a model's profile, or several side by side, as a text table, Markdown or JSON."""

from __future__ import annotations

import json

from nin.analysis.profile import ModelProfile

OPTIMIZER_NAMES = {"sgd": "plain SGD", "momentum": "SGD with momentum", "adam": "Adam"}


def mib(n: int | float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def si(n: int | float) -> str:
    """1234567 -> '1.23 M'."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if n < 100 * scale else f"{n / scale:.1f} {unit}"
    return f"{n:g}"


def pct(value: float, reference: float | None) -> str:
    """How far ``value`` is from ``reference``: '+1.7%' ('' without a reference; never '-0.0%')."""
    if not reference:
        return ""
    return f"{value / reference - 1:+.1%}".replace("-0.0%", "+0.0%")


def _grid(rows: list[list[str]], markdown: bool, right: set[int]) -> list[str]:
    if markdown:
        head = "| " + " | ".join(rows[0]) + " |"
        rule = "| " + " | ".join("---:" if i in right else "---" for i in range(len(rows[0]))) + " |"
        return [head, rule] + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _setting(p: ModelProfile) -> str:
    half = {"bf16": "bfloat16", "fp16": "float16"}
    dtype = "float32" if p.amp == "none" else f"{half[p.amp]} autocast (float32 weights)"
    return (f"input {'x'.join(map(str, p.input_size))}, batch {p.batch}, {dtype}, "
            f"{OPTIMIZER_NAMES[p.optimizer]}")


def render(p: ModelProfile, fmt: str = "table") -> str:
    """One model: the per-layer table, the totals and the memory estimates beside the measurements."""
    if fmt == "json":
        return json.dumps(p.to_dict(), indent=1) + "\n"
    md = fmt == "markdown"
    out: list[str] = []
    title = f"{p.model}: {_setting(p)}"
    out += [f"### {title}", ""] if md else [title, ""]
    rows = [["layer", "type", "output", "params", "MACs", f"kept for backward (batch {p.batch})"]]
    for lp in p.layers:
        rows.append([lp.name, lp.kind, "x".join(map(str, lp.shape)), f"{lp.params:,}",
                     si(lp.macs) if lp.macs else "-", mib(lp.kept * p.batch) if lp.kept else "-"])
    rows.append(["total", "", "", f"{p.params:,}", si(p.macs), mib(sum(lp.kept for lp in p.layers) * p.batch)])
    out += _grid(rows, md, {3, 4, 5})
    out.append("")
    fc = f"{p.first_fc_params:,} parameters" if p.first_fc_params else "none (global average pooling)"
    facts = [
        f"parameters: {p.params:,} ({mib(p.param_bytes)} in float32)",
        f"forward: {si(p.macs)} MACs = {si(p.flops)}FLOP per image (1 MAC = 2 FLOPs; convolutions and "
        f"fully connected layers)",
        f"training step: {si(p.train_flops)}FLOP per image (forward + backward, {p.train_flops / p.flops:.2f}x the "
        f"forward)" if p.flops else "training step: 0 FLOP",
        f"first fully connected layer: {fc}",
    ]
    out += [f"- {f}" for f in facts] if md else facts
    out.append("")
    out += _memory_table(p, md)
    if p.measured:
        out.append("")
        note = f"measured on {p.measured['device']}: {p.measured['method']}"
        out.append(f"_{note}_" if md else note)
    return "\n".join(out) + "\n"


def _memory_table(p: ModelProfile, md: bool) -> list[str]:
    m = p.measured
    rows = [[f"memory at batch {p.batch}", "estimate", "measured", "difference"]]
    for what, mem in (("inference", p.inference), ("training", p.training)):
        got = m.get(what)
        rows.append([f"**{what}** (peak)" if md else f"{what} (peak)", mib(mem.peak),
                     mib(got) if got else "-", pct(mem.peak, got)])
        for part, n in mem.parts.items():
            rows.append([f"  {part}" if not md else f"&nbsp;&nbsp;{part}", mib(n), "", ""])
    return _grid(rows, md, {1, 2, 3})


def _with_measured(p: ModelProfile, what: str, estimate: int) -> str:
    got = p.measured.get(what)
    return f"{mib(estimate)} (measured {mib(got)})" if got else mib(estimate)


def render_compare(profiles: list[tuple[str, ModelProfile]], fmt: str = "table") -> str:
    """Several models side by side: parameters, compute, the first fully connected layer, memory."""
    if fmt == "json":
        return json.dumps([{"label": label, **p.to_dict()} for label, p in profiles], indent=1) + "\n"
    md = fmt == "markdown"
    batch = profiles[0][1].batch
    rows = [["model", "input", "params", "params (MiB)", "first FC layer", "forward MACs/image",
             "training FLOP/image", f"inference memory (batch {batch})", f"training memory (batch {batch})"]]
    for label, p in profiles:
        rows.append([label, "x".join(map(str, p.input_size)), f"{p.params:,}", f"{p.param_bytes / 2**20:,.1f}",
                     f"{p.first_fc_params:,}" if p.first_fc_params else "none",
                     si(p.macs), si(p.train_flops), _with_measured(p, "inference", p.inference.peak),
                     _with_measured(p, "training", p.training.peak)])
    out = _grid(rows, md, {2, 3, 4, 5, 6, 7, 8})
    setting = _setting(profiles[0][1]).split(", ", 1)[1]  # all but the input, which differs per model
    note = f"each model at its own input; {setting}"
    measured = [p.measured for _, p in profiles if p.measured]
    if measured:
        note += f"; measured on {measured[0]['device']}: {measured[0]['method']}"
    out += ["", f"_{note}_" if md else note]
    return "\n".join(out) + "\n"

