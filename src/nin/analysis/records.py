"""Benchmark records: one JSON file per ``nin bench --record DIR`` run, naming the machine it ran on.

A record holds what ``nin bench --json`` prints (the settings, every measured case or the
time-to-accuracy epochs), or for the kinds ``serve-load`` and ``serve-soak`` what
``benchmarks/serve_load.py`` and ``benchmarks/serve_soak.py`` measured of ``nin serve``,
together with the command, the time, and the machine's
:func:`nin.analysis.doctor.fingerprint` (its kind, CPU model and features, GPUs, torch and
oneDNN versions). Figures in ``docs/performance.md`` are rendered from the records
in ``benchmarks/results/`` by ``benchmarks/render_performance.py``, one table per
machine kind, each ceiling from that machine's own measured matmul peak.

A record is never overwritten: a second one in the same second gets a suffix.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

from nin.atomic import write_text
from nin.errors import NinError

FORMAT = "nin-bench-record"
VERSION = 1
WHAT = ("speed", "time-to-accuracy", "serve-load", "serve-soak")  # serve-*: benchmarks/serve_load.py, serve_soak.py


def make_record(result: dict[str, Any], what: str, command: str, *, machine: dict[str, Any] | None = None,
                source: str | None = None, when: _dt.datetime | None = None) -> dict[str, Any]:
    """A record of one bench run: ``result`` as ``nin bench --json`` prints it, and where and how it was made.

    ``machine`` defaults to this machine's fingerprint. ``source`` says how a record was made when it was not
    written by ``nin bench --record`` itself (figures copied from an earlier report, say).
    """
    if what not in WHAT:
        raise NinError(f"unknown record kind {what!r}; choose {', '.join(WHAT)}")
    if machine is None:
        from nin.analysis.doctor import fingerprint

        machine = fingerprint()
    when = when or _dt.datetime.now(_dt.timezone.utc)
    rec = {"format": FORMAT, "version": VERSION, "what": what, "command": command,
           "recorded": when.isoformat(timespec="seconds"), "machine": machine, "result": result}
    if source:
        rec["source"] = source
    return rec


def _subject(rec: dict[str, Any]) -> str:
    result = rec["result"]
    if rec["what"].startswith("serve-"):
        return str(result.get("model", "model"))
    if rec["what"] == "speed":
        cases = result.get("cases", [])
        return f"{result.get('model', 'model')}{'-ablate' if len(cases) > 2 else ''}"
    cfg = result.get("config", {})
    return f"{cfg.get('model', {}).get('name', 'model')}-{cfg.get('train', {}).get('epochs', '?')}ep"


def record_name(rec: dict[str, Any]) -> str:
    """``DATE-TIME-KIND-WHAT-SUBJECT.json``, e.g. ``20261202-013000-cpu-amx-speed-nin_d2l.json``."""
    stamp = _dt.datetime.fromisoformat(rec["recorded"]).strftime("%Y%m%d-%H%M%S")
    what = "tta" if rec["what"] == "time-to-accuracy" else rec["what"]
    name = f"{stamp}-{rec['machine'].get('kind', 'unknown')}-{what}-{_subject(rec)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) + ".json"


def write_record(rec: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``rec`` as a new file in ``directory`` (made if missing); never replaces an existing record."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NinError(f"--record {directory}: not a directory")
    base = record_name(rec)
    text = json.dumps(rec, indent=1) + "\n"
    for n in range(1, 100):
        path = directory / (base if n == 1 else base.replace(".json", f"-{n}.json"))
        if not path.exists():
            return write_text(path, text, overwrite=False)
    raise NinError(f"{directory}: too many records named {base}")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NinError(f"{path}: not a readable JSON record ({e})") from None


def read_record(path: str | os.PathLike[str], rec: Any = None) -> dict[str, Any]:
    """One record, checked (``rec``: its already parsed content): a file that is not one is a NinError naming it."""
    path = Path(path)
    rec = _load(path) if rec is None else rec
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise NinError(f"{path}: not a nin bench record (no \"format\": \"{FORMAT}\")")
    if rec.get("version") != VERSION or rec.get("what") not in WHAT:
        raise NinError(f"{path}: unsupported record (version {rec.get('version')!r}, what {rec.get('what')!r})")
    if not isinstance(rec.get("machine"), dict) or not isinstance(rec.get("result"), dict):
        raise NinError(f"{path}: a record needs a \"machine\" and a \"result\" object")
    return rec


def load_records(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record in ``directory`` (``*.json`` that declare the record format), oldest first; other JSON
    files there (the stress script's, say) are left alone."""
    records = []
    for path in sorted(Path(directory).glob("*.json")):
        content = _load(path)  # unreadable JSON here is an error: every file in a results folder is ours
        if isinstance(content, dict) and content.get("format") == FORMAT:
            rec = read_record(path, content)
            rec["file"] = path.name
            records.append(rec)
    return sorted(records, key=lambda r: r["recorded"])
