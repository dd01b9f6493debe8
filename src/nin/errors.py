"""The one exception type that means "the user asked for something we cannot do".

The command line catches :class:`NinError` and prints its message as a single
line; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NinError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, a bad flag value."""


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``name`` (ignoring case), or ``""`` if none is close.
    ``name`` may come from a file and be of any type."""
    by_lower = {c.lower(): c for c in choices}
    near = difflib.get_close_matches(str(name).lower(), by_lower, n=1)
    return f"; did you mean {by_lower[near[0]]!r}?" if near else ""
