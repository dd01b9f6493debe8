"""A study's report: per-variant mean and standard deviation over seeds, the runs that diverged or stayed at
chance, curves and the sweep figure (``report.md``, ``curves.png``, ``sweep.png``, ``study.json``)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nin.atomic import write_text
from nin.errors import NinError
from nin.experiments.study import Budget, Study, StudyConfig, _classes, _same, load_records, slug


@dataclass
class Row:
    label: str
    value: float | None
    params: int
    macs: int
    final: list[float]  # final test accuracy of each seed that finished
    best: list[float]
    loss: list[float]
    seconds: list[float]
    seeds: int
    notes: list[str]


def summarize(study: Study, budget: Budget, records: Sequence[dict[str, Any]]) -> list[Row]:
    rows = []
    for v in budget.variants:
        rs = [r for r in records if r["variant"] == v.label]
        if not rs:
            continue
        finished = [r for r in rs if r["status"] != "diverged" and r["history"]]
        notes = []
        for r in rs:
            if r["status"] == "diverged":
                d = r["diverged"]
                notes.append(f"seed {r['seed']} diverged at step {d['step']} (epoch {d['epoch']})")
            elif r["status"] == "at chance":
                notes.append(f"seed {r['seed']} at chance")
            for e in r.get("rollbacks", []):
                notes.append(f"seed {r['seed']} rolled back at step {e['step']} (lr x{e['lr_scale']:g})")
        rows.append(Row(
            v.label, v.value, rs[0]["params"], rs[0]["macs"],
            [r["history"][-1]["test_acc"] for r in finished],
            [max(h["test_acc"] for h in r["history"]) for r in finished],
            [r["history"][-1]["train_loss"] for r in finished],
            [r["seconds"] for r in rs], len(rs), notes,
        ))
    return rows


def mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def render_report(study: Study, sc: StudyConfig, records: Sequence[dict[str, Any]], command: str) -> str:
    budget = sc.budget_of(study)
    rows = summarize(study, budget, records)
    env = records[0]["env"] if records else {}
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"# Study `{study.name}` (version {study.version}): {study.title}",
        "",
        study.question,
        "",
        f"- **Budget** `{sc.budget}`: {budget.description}.",
        f"- **Seeds**: {', '.join(map(str, seeds))}; each cell is the mean ± standard deviation over the seeds "
        "that finished.",
        f"- **Command**: `{command}`",
        f"- **Environment**: torch {env.get('torch', '?')}, {env.get('device', '?')}"
        f"{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, {env.get('processor', '?')} with "
        f"{env.get('threads', '?')} threads, {str(env.get('date', '?'))[:10]}.",
        "- The exact configuration of each variant is in `configs/`; every run's own directory holds its "
        "metrics and checkpoints.",
        "",
        f"| {study.axis} | parameters | MACs/image | final test acc | best test acc | final train loss | "
        "time/run | notes |",
        "| --- | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for r in rows:
        notes = "; ".join(r.notes) or "-"
        lines.append(f"| {r.label} | {r.params:,} | {r.macs / 1e6:,.2f} M | {mean_std(r.final)} | {mean_std(r.best)} "
                     f"| {mean_std(r.loss)} | {statistics.median(r.seconds):.0f} s | {notes} |")
    diverged = [r for r in records if r["status"] == "diverged"]
    chance_runs = [r for r in records if r["status"] == "at chance"]
    lines += ["", "## Divergence and runs at chance", ""]
    if not diverged and not chance_runs and not any(r.get("rollbacks") for r in records):
        lines.append("No run diverged (non-finite loss) or ended at chance accuracy.")
    for r in diverged:
        d = r["diverged"]
        lines.append(f"- {r['variant']}, seed {r['seed']}: loss {d['loss']} at step {d['step']} (epoch {d['epoch']}).")
    for r in chance_runs:
        h = r["history"][-1]
        lines.append(f"- {r['variant']}, seed {r['seed']}: finite loss but test accuracy {h['test_acc']:.4f} "
                     f"after {h['epoch']} epoch(s), train loss {h['train_loss']:.4f} (chance is "
                     f"{1 / _classes_of(r):.2f}).")
    for r in records:
        for e in r.get("rollbacks", []):
            lines.append(f"- {r['variant']}, seed {r['seed']}: rolled back at step {e['step']} (epoch {e['epoch']}), "
                         f"learning rate x{e['lr_scale']:g} from there.")
    lines += ["", "## Figures", "", "![learning curves](curves.png)", "", f"![{study.axis} against final test "
              "accuracy](sweep.png)", ""]
    return "\n".join(lines)


def _classes_of(record: dict[str, Any]) -> int:
    from nin.training.config import RunConfig

    return _classes(RunConfig.from_dict(record["config"]))


def plot_study(study: Study, budget: Budget, records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from nin.plots import _save

    rows = summarize(study, budget, records)
    labels = [r.label for r in rows]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for i, label in enumerate(labels):
        c = colors[i % len(colors)]
        runs = [x for x in records if x["variant"] == label]
        if not any(r["history"] for r in runs):  # every seed diverged inside its first epoch: nothing to draw
            epochs = sorted({r["diverged"]["epoch"] for r in runs if r["status"] == "diverged"})
            ax_acc.plot([], [], "x", color=c, label=f"{label}: diverged in epoch {', '.join(map(str, epochs))}")
        for j, r in enumerate(runs):
            h = r["history"]
            if not h:
                continue
            ep = [m["epoch"] for m in h]
            kw = dict(color=c, alpha=0.8, lw=1.2, label=label if j == 0 else None)
            ax_loss.plot(ep, [m["train_loss"] for m in h], **kw)
            ax_acc.plot(ep, [m["test_acc"] for m in h], **kw)
            if r["status"] == "diverged":
                ax_acc.plot(ep[-1], h[-1]["test_acc"], "x", color=c, ms=8)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss (one line per seed)")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (x: diverged after this epoch)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=7)
    fig.suptitle(f"{study.name}: {study.title}", fontsize=9)
    fig.tight_layout()
    paths = [_save(fig, out / "curves.png")]

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    numeric = all(r.value is not None for r in rows)
    xs = [r.value if numeric else i for i, r in enumerate(rows)]
    means = [statistics.mean(r.final) if r.final else float("nan") for r in rows]
    errs = [statistics.stdev(r.final) if len(r.final) > 1 else 0.0 for r in rows]
    ax.errorbar(xs, means, yerr=errs, fmt="o-" if numeric else "o", capsize=4)
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r.final), r.final, s=10, color="gray", alpha=0.6, zorder=3)
        if not r.final:
            ax.annotate("diverged", (x, 0.1), ha="center", fontsize=8, color="red")
    if numeric and study.log_axis and any(r.final for r in rows):  # nothing drawn: no limits to log-scale
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, labels, rotation=15, fontsize=8)
    ax.set(xlabel=study.axis, ylabel="final test accuracy", title="mean ± std over seeds (dots: each seed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out / "sweep.png"))
    return paths


def write_report(study: Study, sc: StudyConfig, out: str | os.PathLike, command: str) -> Path:
    """report.md, curves.png, sweep.png, configs/ and study.json in ``out`` from its recorded runs."""
    out = Path(out)
    meta = {"study": study.name, "version": study.version, "budget": sc.budget}
    records = [r for r in load_records(out) if _same(r, meta)]
    if not records:
        raise NinError(f"{out}: no finished runs of study {study.name!r} (budget {sc.budget}) to report")
    budget = sc.budget_of(study)
    for v in budget.variants:
        first = next((r for r in records if r["variant"] == v.label), None)
        if first is not None:  # the first seed's config; the others differ only in "seed"
            write_text(out / "configs" / f"{slug(v.label)}.json", json.dumps(first["config"], indent=1) + "\n")
    plot_study(study, budget, records, out)
    doc = {**meta, "title": study.title, "question": study.question, "budget_description": budget.description,
           "variants": [{"label": v.label, "changes": dict(v.changes)} for v in budget.variants],
           "seeds": sorted({r["seed"] for r in records}), "env": records[0]["env"], "command": command,
           "written": _dt.datetime.now().isoformat(timespec="seconds")}
    write_text(out / "study.json", json.dumps(doc, indent=1) + "\n")
    return write_text(out / "report.md", render_report(study, sc, records, command))
