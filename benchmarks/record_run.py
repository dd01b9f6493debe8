"""Keep a finished ``nin train`` run as an accuracy record in benchmarks/results/.

    python benchmarks/record_run.py RUN --command "nin train --preset d2l ..." [--results DIR]

For runs too long for ``nin bench --time-to-accuracy`` (the chapter's recipe on a CPU, resumed across a
stop): the record holds the run's per-epoch metrics (``metrics.jsonl``) and its configuration, with this
machine's ``nin doctor`` fingerprint, so run it on the machine that trained. Its time is the run's own wall
time (from the start of training: start-up and data loading are not counted, unlike ``nin bench``), and its
``source`` says it was converted. docs/accuracy.md is rendered from such records by render_accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from nin.analysis.records import make_record, write_record  # noqa: E402
from nin.errors import NinError  # noqa: E402

KEPT = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec")


def run_result(run: Path) -> dict:
    """What ``nin bench --time-to-accuracy`` would have recorded for ``run``, from its files."""
    try:
        config = json.loads((run / "config.json").read_text())["config"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise NinError(f"{run}: not a finished run directory ({e})") from None
    if not rows:
        raise NinError(f"{run}: no finished epoch in metrics.jsonl")
    epochs = [{**{k: r[k] for k in KEPT if k in r}, "seconds": r["wall_time"]} for r in rows]
    return {"preset": None, "targets": {}, "epochs": epochs, "seconds": rows[-1]["wall_time"], "config": config}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--command", required=True, help="the nin train command that made the run")
    ap.add_argument("--note", default="", help="anything else a reader must know (a resume, another job running)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    try:
        result = run_result(args.run)
    except NinError as e:
        print(f"record_run: {e}", file=sys.stderr)
        return 2
    source = ("Converted from a nin train run directory by benchmarks/record_run.py; its time is the run's wall "
              "time from the start of training." + (f" {args.note}" if args.note else ""))
    print(write_record(make_record(result, "time-to-accuracy", args.command, source=source), args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
