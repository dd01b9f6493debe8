"""Render docs/accuracy.md from the accuracy records in benchmarks/results/.

    python benchmarks/render_accuracy.py            # write docs/accuracy.md
    python benchmarks/render_accuracy.py --check    # exit 1 if the file is not what the records give

Each record is one ``nin bench --time-to-accuracy --record`` run (or a ``nin train`` run converted by
``benchmarks/record_run.py``), naming its machine by ``nin doctor``'s fingerprint. Runs of the same command
on the same machine kind that differ only in ``--seed`` form one row: test accuracy as mean ± std over the
seeds (the sample standard deviation; a single seed shows no ±). Runs scored on held-out training images
(``--holdout``) are the validation runs settings were chosen on; they get a table of their own and never
appear as test accuracy. Parameters and MACs are counted from the model each row trained
(:mod:`nin.analysis.profile`). Published figures are listed apart and marked as such: they were not run here.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from nin.analysis.records import load_records  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "accuracy.md"

#: Published Fashion-MNIST test accuracies, as their sources report them (not run here).
PUBLISHED = (
    ("VGG16", "about 26 M", "published benchmark of the data set (zalandoresearch/fashion-mnist README)", "93.5%"),
    ("ResNet18", "11 M", "published benchmark of the data set (zalandoresearch/fashion-mnist README)", "94.9%"),
    ("WRN-28-10 + random erasing", "36 M", "Zhong et al., Random Erasing Data Augmentation (arXiv:1708.04896)",
     "96.35%"),
)


def _seedless(command: str) -> str:
    """The command as a row shows it: without its --seed (the row spans seeds) or where it was recorded."""
    return re.sub(r"\s--(seed|record)[ =]\S+", "", command)


#: Settings that do not change what a run learns or how it is scored: left out when runs are grouped by recipe.
NOT_RECIPE = {"seed", "device", "data.data_dir", "data.download", "data.verify", "checkpoint.every_steps",
              "checkpoint.keep_last", "train.tensorboard", "train.tensorboard_every"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def _recipe(cfg: dict[str, Any]) -> tuple:
    """A record's settings as a hashable recipe: today's defaults for settings added since it was recorded (a
    command such as ``--preset fast`` may mean another recipe after the preset changed), without NOT_RECIPE."""
    from nin.training.config import RunConfig

    flat = _flat(RunConfig().to_dict()) | _flat(cfg)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in NOT_RECIPE))


def _differences(recipes: list[tuple]) -> list[str]:
    """For recipes recorded under one command: what sets each apart, e.g. ``train.tta=True`` (empty when one)."""
    if len(recipes) < 2:
        return [""] * len(recipes)
    dicts = [dict(r) for r in recipes]
    keys = sorted({k for d in dicts for k in d if len({e.get(k) for e in dicts}) > 1})
    return [" (" + ", ".join(f"{k}={d.get(k)}" for k in keys) + ")" for d in dicts]


def _note(rec: dict[str, Any]) -> str:
    source = rec.get("source") or ""
    return " (transcribed)" if source.startswith("Transcribed") else " (converted run)" if source else ""


def _model_costs(cfg: dict[str, Any], cache: dict) -> tuple[int, int]:
    """(parameters, MACs per image) of the model a record's config trained."""
    from nin.analysis.profile import profile_model
    from nin.models import create_model

    model_cfg = cfg.get("model", {})
    resize = (cfg.get("data") or {}).get("resize")  # the size it was fed: part of the MACs
    key = (model_cfg.get("name"), tuple(sorted((model_cfg.get("options") or {}).items())), resize)
    if key not in cache:
        options = dict(model_cfg.get("options") or {})
        if resize:
            options["input_size"] = (resize,) * 2
        prof = profile_model(create_model(key[0], **options), batch=1)
        cache[key] = (prof.params, prof.macs)
    return cache[key]


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%}"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%}"


def rows(records: list[dict[str, Any]], holdout: bool) -> list[str]:
    groups: dict[tuple[str, str, tuple], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        cfg = rec["result"].get("config", {})
        if rec["what"] != "time-to-accuracy" or bool(cfg.get("data", {}).get("holdout")) != holdout:
            continue
        groups[(rec["machine"].get("kind", "unknown"), _seedless(rec["command"]), _recipe(cfg))].append(rec)
    by_command = defaultdict(list)  # one command that stood for several recipes: each row says which
    for kind, command, recipe in groups:
        by_command[(kind, command)].append(recipe)
    label = {(k, c, r): d for (k, c), rs in by_command.items() for r, d in zip(rs, _differences(rs))}
    cache: dict = {}
    out = []
    for (kind, command, recipe), recs in sorted(groups.items(), key=lambda kv: kv[1][0]["recorded"]):
        cfg = recs[0]["result"]["config"]
        params, macs = _model_costs(cfg, cache)
        finals = [r["result"]["epochs"][-1]["test_acc"] for r in recs if r["result"].get("epochs")]
        seconds = [r["result"]["seconds"] for r in recs]
        epochs = recs[0]["result"]["epochs"][-1]["epoch"] if recs[0]["result"].get("epochs") else "-"
        seeds = sorted(r["result"]["config"].get("seed", 0) for r in recs)
        files = ", ".join(f"[{i + 1}](../benchmarks/results/{r['file']})" for i, r in enumerate(recs))
        note = label[(kind, command, recipe)] + _note(recs[0])
        shared = "*" if any("shared the two cores" in (r.get("source") or "") + (r.get("note") or "")
                            for r in recs) else ""
        out.append(f"| {cfg['model']['name']} | {params:,} | {_fmt_count(macs)} | `{command}`{note} | {epochs} | "
                   f"{statistics.median(seconds):,.0f} s{shared} | {kind} | {_acc(finals) if finals else '-'} | "
                   f"{', '.join(map(str, seeds))} | {files} |")
    return out


#: What the chapter prints after its 10 epochs (seed 002, on a GPU): loss, train and test accuracy.
CHAPTER = {"train_loss": 0.563, "train_acc": 0.783, "test_acc": 0.772}


def chapter_section(records: list[dict[str, Any]]) -> list[str]:
    """The runs of the chapter's model (nin_d2l) side by side, then each epoch by epoch, beside the chapter's
    printed figures."""
    out, summary = [], []
    for rec in records:
        cfg = rec["result"].get("config", {})
        if rec["what"] != "time-to-accuracy" or cfg.get("model", {}).get("name") != "nin_d2l":
            continue
        t = cfg.get("train", {})
        accs = {e["epoch"]: e["test_acc"] for e in rec["result"]["epochs"]}
        at10 = f"{accs[10]:.3f}" if 10 in accs else "-"
        summary.append(f"| `{_seedless(rec['command'])}` | {rec['machine'].get('kind', 'unknown')} | {t.get('lr')} | "
                       f"{len(accs)} | {at10} | {max(accs.values()):.3f} | {accs[max(accs)]:.3f} |")
        out += [f"`{_seedless(rec['command'])}` on {rec['machine'].get('kind', 'unknown')}: lr {t.get('lr')}, batch "
                f"{t.get('batch_size')}, precision {t.get('amp')} ([record](../benchmarks/results/{rec['file']}))"
                + (f". {rec['source']}" if rec.get("source") else "."), "",
                "| epoch | train loss | train acc | test acc | img/s | time |",
                "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in rec["result"]["epochs"]:
            loss, acc = e.get("train_loss"), e.get("train_acc")
            ips = e.get("examples_per_sec")
            out.append(f"| {e['epoch']} | {'-' if loss is None else f'{loss:.3f}'} | "
                       f"{'-' if acc is None else f'{acc:.3f}'} | {e['test_acc']:.3f} | "
                       f"{'-' if ips is None else f'{ips:,.0f}'} | {e['seconds']:,.0f} s |")
        out += [f"| the chapter, after 10 | {CHAPTER['train_loss']} | {CHAPTER['train_acc']} | {CHAPTER['test_acc']} "
                "| 3,192.9 (a GPU) | - |", ""]
    if not summary:
        return ["No run of the chapter's recipe is recorded yet.", ""]
    return ["| run | machine | lr | epochs | test acc after 10 | best test acc | last test acc |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *summary,
            f"| the chapter's printout | a GPU | 0.1 | 10 | {CHAPTER['test_acc']} | - | {CHAPTER['test_acc']} |", "",
            *out]


#: The recipe the ablation table changes one setting of, as its validation runs are recorded.
ABLATION_BASE = "nin train --holdout 5000 --preset fast"


def _todays_preset() -> tuple:
    """The recipe ``ABLATION_BASE`` stands for today (the preset may have changed since older rows were run)."""
    from nin.training.config import override, preset

    return _recipe(override(preset("fast"), {"data.holdout": 5000}).to_dict())


def ablation_section(records: list[dict[str, Any]]) -> list[str]:
    """The fast preset on held-out images with one setting changed at a time, beside the preset itself run on the
    same machine kind: what each technique gives at that length (``bash benchmarks/accuracy.sh ablate``).

    A base is a run of the preset as it was when it ran (no change) or as it is today (a change that gives
    today's recipe, from before the preset became it); each other row is measured against the base whose
    settings are closest, named in its last column when the preset changed between its runs."""
    today = _todays_preset()
    by_kind: dict[str, dict[tuple[str, tuple], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        command = _seedless(rec["command"]).strip()
        if rec["what"] == "time-to-accuracy" and (command == ABLATION_BASE or command.startswith(ABLATION_BASE + " ")):
            change = command[len(ABLATION_BASE):].strip()
            by_kind[rec["machine"].get("kind", "unknown")][(change, _recipe(rec["result"]["config"]))].append(rec)
    out = []
    for kind, changes in sorted(by_kind.items()):
        bases = {}  # recipe -> (how the table names it, its runs)
        for (change, recipe), recs in changes.items():
            if not change or recipe == today:
                name = f"`{change}`, today's preset" if change else "the preset"
                bases.setdefault(recipe, (name, []))[1].extend(recs)
        if not bases:
            continue  # no baseline on this machine kind to compare with
        if any(name != "the preset" for name, _ in bases.values()):  # the preset changed since those runs
            bases = {r: ("the preset then" if name == "the preset" else name, recs)
                     for r, (name, recs) in bases.items()}
        labels = dict(zip(bases, _differences(list(bases))))  # the preset changed between its runs: which is which
        out += [f"On {kind} (`{ABLATION_BASE}` plus the change, against the run of the preset whose settings are "
                "closest):", "",
                "| change | epochs | holdout accuracy | against the preset | records |",
                "| --- | ---: | ---: | ---: | --- |"]
        for (change, recipe), recs in sorted(changes.items(), key=lambda kv: (kv[0][0] != "", kv[1][0]["recorded"])):
            finals = [r["result"]["epochs"][-1]["test_acc"] for r in recs]
            files = ", ".join(f"[{i + 1}](../benchmarks/results/{r['file']})" for i, r in enumerate(recs))
            if not change or recipe == today:
                name, _ = bases[recipe]
                settings = f": {labels[recipe].strip()[1:-1]}" if labels[recipe] and not change else ""
                shown = f"none ({name}{settings})" if not change else f"`{change}` ({name.split(', ')[1]})"
                against = "-"
            else:
                closest = min(bases, key=lambda b: len(set(b) ^ set(recipe)))
                base = statistics.mean(r["result"]["epochs"][-1]["test_acc"] for r in bases[closest][1])
                shown = f"`{change}`"
                against = f"{100 * (statistics.mean(finals) - base):+.2f} points"
                if len(bases) > 1:  # which base: by name, and by its settings where names repeat
                    name = bases[closest][0].split(", ")[0]
                    repeated = sum(n.split(", ")[0] == name for n, _ in bases.values()) > 1
                    against += f" (vs {name}{': ' + labels[closest].strip()[1:-1] if repeated else ''})"
            out.append(f"| {shown} | {recs[0]['result']['epochs'][-1]['epoch']} | {_acc(finals)} | {against} | "
                       f"{files} |")
        out.append("")
    return out or ["No ablation run is recorded yet.", ""]


#: d2l's 224x224 baselines from our registry, with the names the page gives them.
BASELINES_224 = {"alexnet": "AlexNet", "vgg11": "VGG-11"}


def baselines_224(records: list[dict[str, Any]]) -> list[str]:
    """What the page says of the AlexNet and VGG-11 baselines: which were trained here (on the test set), and
    what it takes to train the others."""
    configs = [r["result"].get("config") or {} for r in records if r["what"] == "time-to-accuracy"]
    trained: dict[str, set[str]] = defaultdict(set)  # model -> "lr X for N epochs" of each test-set run
    for c in configs:
        train = c.get("train") or {}
        if not (c.get("data") or {}).get("holdout"):
            model = c.get("model") or {}
            width = (model.get("options") or {}).get("width")
            at = f" at width {width:g}" if width not in (None, 1) else ""  # d2l trains VGG-11 at a quarter
            trained[model.get("name")].add(f"lr {train.get('lr')} for {train.get('epochs')} epochs{at}")
    lines = [f"`{n}` is d2l's {BASELINES_224[n]} at 224x224 ({', '.join(sorted(trained[n]))}; the recipe in "
             "its row's command)." for n in BASELINES_224 if n in trained]
    missing = [n for n in BASELINES_224 if n not in trained]
    if missing:
        cache: dict = {}
        params = {n: _model_costs({"model": {"name": n}}, cache)[0] for n in missing}  # at full width
        names = " and ".join(f"{BASELINES_224[n]} (`{n}`, {params[n] / 1e6:.1f} M parameters)" for n in missing)
        verb, them = ("has", "it") if len(missing) == 1 else ("have", "them")
        lines.append(f"d2l's {names} {verb} not been trained here (`nin profile {missing[0]}` counts what a step "
                     f"costs; `bash benchmarks/gpu_accuracy.sh chapter` trains {them} on a GPU with the chapter's "
                     "recipe).")
    return lines


HEADER = ("| model | parameters | MACs / image | recipe (command) | epochs | wall time (median) | machine | "
          "test accuracy | seeds | records |", "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | --- | --- |")


def render(records: list[dict[str, Any]]) -> str:
    lines = ["# Accuracy on Fashion-MNIST", "",
             "Rendered by `python benchmarks/render_accuracy.py` from the records in `benchmarks/results/`; do not",
             "edit by hand. Each row is one command run on one machine kind (`nin doctor`), once per seed; test",
             "accuracy is on the real 10,000 test images after the last epoch, as mean ± sample std over the seeds.",
             "Wall time is the whole command, interpreter start-up and data loading included (a converted",
             "`nin train` run counts from the start of training). A recipe with `train.tta` on is scored with flip",
             "test-time augmentation: the mean of the predictions on each test image and its mirror image.", "",
             "## Runs", "", *HEADER, *rows(records, holdout=False), "",
             "\\* other jobs shared the cores during the run: the time is not the machine's speed (the record's note "
             "says more).", "",
             "`lenet` is d2l's LeNet-5 (sigmoid, average pooling), once with the chapter series' own recipe",
             "(lr 0.9, batch 256, 10 epochs, inputs not normalized) and once with `nin train`'s default recipe.",
             *baselines_224(records), "",
             "## The chapter's recipe (`--preset d2l`), epoch by epoch", "",
             "Its own printout after 10 epochs is `loss 0.563, train acc 0.783, test acc 0.772` (on a GPU);",
             "a reader's note in the chapter's notes says lr 0.1 blows up in later epochs and lr 0.04 over 20 epochs",
             "does better.", "", *chapter_section(records),
             "## Validation runs (settings chosen here)", "",
             "Scored on 5,000 training images held out (`--holdout`), never on the test set.", "",
             HEADER[0].replace("test accuracy", "holdout accuracy"), HEADER[1], *rows(records, holdout=True), "",
             "\\* trained while other jobs shared the cores: the time is not the machine's speed.", "",
             "## What each setting gives (ablation)", "",
             "The fast preset with one or two settings changed, scored on the same held-out images.", "",
             *ablation_section(records),
             "## Published figures (not run here)", "",
             "| model | parameters | source | test accuracy |", "| --- | ---: | --- | ---: |",
             *(f"| {m} | {p} | {s} | {a} |" for m, p, s, a in PUBLISHED), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/accuracy.md differs from the records")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    text = render(load_records(args.results))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what the records give; run python benchmarks/render_accuracy.py",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
