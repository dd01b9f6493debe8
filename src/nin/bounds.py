"""Ranges of numeric settings: declared once, beside the setting, and checked in one place.

A config dataclass declares a field's range in its metadata (:func:`bounded`); :func:`check_ranges`
checks every field of a config against its range, whether the value came from a flag, a config file
or a run's saved ``config.json``; and :func:`flag_type` turns the same range into an ``argparse`` type,
so a flag is refused as it is parsed, in the flag's own words. A value outside every sane range (a seed of
10**30, a crop padding of 10**9, a width of 1e-9) is one line, never a traceback deep inside torch.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_type_hints

from nin.errors import NinError

MAX_IMAGE_SIDE = 4096  # the largest input height or width a model is built for, or images are resized to


@dataclass(frozen=True)
class Range:
    """The values ``lo <= v <= hi`` (``<`` at an open end); None: no bound on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: object) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def text(self) -> str:
        """``[0, 1)``, ``>= 1``, ``(0, 10]``: the range as users write it."""
        if self.lo is None and self.hi is None:
            return "any finite number"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"

    def check(self, value: Any, name: str) -> None:
        """A :class:`NinError` ``NAME must be in RANGE, got VALUE`` unless ``value`` is in the range."""
        if value not in self:
            word = "in " if self.lo is not None and self.hi is not None else ""
            raise NinError(f"{name} must be {word}{self.text()}, got {_shown(value)}")


THREADS = Range(1, 4096)  # the torch threads of one process


def _num(v: float) -> str:
    if isinstance(v, int) and v >= 10**6:
        for base in (10, 2):
            k = round(math.log(v, base))
            if base**k == v:
                return f"{base}**{k}"
        return f"{v:,}"
    if isinstance(v, int):
        return f"{v:,}" if v >= 10_000 else str(v)
    return f"{v:g}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bounded(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, help: str | None = None, **flag: Any) -> Any:
    """A dataclass field with default ``default`` and a :class:`Range` (None values are not checked); ``help``
    and ``flag`` (``flags``, ``metavar``) describe its command-line flag (:mod:`nin.cli.options`)."""
    return within(Range(lo, hi, lo_open, hi_open), default, help=help, **flag)


def within(r: Range, default: Any, help: str | None = None, **flag: Any) -> Any:
    """:func:`bounded` with a range declared elsewhere: ``within(range_of(TrainConfig, "epochs"), None)`` is a
    setting that stands for another (a study's epochs, a benchmark's batch size) and keeps its range."""
    return field(default=default, metadata={"range": r, "help": help, **flag})


def setting(default: Any = None, help: str | None = None, *, factory: Any = None, **flag: Any) -> Any:
    """A dataclass field that is not a number: its default (or ``factory``), and what its flag says (``help``;
    ``flags``: the option strings; ``action``: store_true or store_false; ``path``: a file or folder name)."""
    meta = {"help": help, **flag}
    return field(default_factory=factory, metadata=meta) if factory is not None else field(default=default,
                                                                                            metadata=meta)


def range_of(cls: type, name: str) -> Range:
    """The range declared for field ``name`` of dataclass ``cls``."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata["range"]
    raise KeyError(name)


def option_strings(cls: type, name: str) -> tuple[str, ...]:
    """The option strings of the flag of field ``name`` of ``cls``: its metadata's ``flags``, else ``--name``
    with dashes (``batch_size``: ``--batch-size``)."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    return meta.get("flags") or (f"--{name.replace('_', '-')}",)


def check_ranges(obj: Any, where: str = "") -> None:
    """Check every bounded field of dataclass instance ``obj`` (each item of a tuple); None passes."""
    for f in fields(obj):
        r = f.metadata.get("range")
        value = getattr(obj, f.name)
        if r is None or value is None:
            continue
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            r.check(v, f"{where}{f.name}" + (f"[{i}]" if i is not None else ""))


def flag_type(r: Range, kind: type = float):
    """An ``argparse`` type: the text as ``kind`` (int or float), refused unless it lies in ``r``."""
    what = f"{'an integer' if kind is int else 'a number'} {'in ' if r.lo is not None and r.hi is not None else ''}"

    def parse(text: str):
        try:
            value = int(text) if kind is int else float(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}{r.text()}, got {_shown(text)}") from None
        if value not in r:
            raise argparse.ArgumentTypeError(f"expected {what}{r.text()}, got {_shown(text)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def setting_type(cls: type, name: str, kind: type | None = None):
    """:func:`flag_type` for field ``name`` of config dataclass ``cls`` (``kind``: the field's type by default)."""
    if kind is None:
        hint = get_type_hints(cls)[name]
        kind = int if hint is int or int in get_args(hint) else float
    return flag_type(range_of(cls, name), kind)
