"""Opening the files a user names: regular files only, and never more bytes than a caller allows.

Every file ``nin`` reads on a user's behalf (images, data files, checkpoints, configs) goes through
:func:`open_regular`, which opens without blocking and then checks what was opened. A FIFO, a socket,
a device (a link to ``/dev/zero``), a directory or a loop of symbolic links is refused with one line
naming the file and what it is, instead of hanging forever or streaming without end. :func:`read_regular`
reads a whole file only up to a cap, so memory is bounded by what the caller expects, never by what the
file holds or claims.

Errors are :class:`FileError` by default; a caller passes its own subclass of
:class:`~nin.errors.NinError` (``DataError``, ``CheckpointError``) as ``error``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from nin.errors import NinError


class FileError(NinError):
    """A named file cannot be used: missing, not a regular file, unreadable, or larger than allowed."""


def kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a FIFO", "a character device", ...)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def os_reason(e: OSError) -> str:
    """The reason of an ``OSError`` in words, lower case ("no such file or directory")."""
    if e.errno == errno.ELOOP:
        return "a loop of symbolic links"
    why = e.strerror or str(e) or type(e).__name__
    return why[:1].lower() + why[1:]


def _stat_as(path, is_kind, what: str, error: type[NinError], name: str | None, missing: str | None):
    """``os.stat`` of ``path`` (links followed) if ``is_kind`` of its mode; otherwise ``error``, naming it as
    ``name`` (default: the path) and saying what it is instead (``missing``: the words when there is none)."""
    name = name or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{name}: {missing or 'no such file or directory'}") from None
    except OSError as e:
        raise error(f"{name}: {os_reason(e)}") from None
    if not is_kind(st.st_mode):
        raise error(f"{name}: {kind(st.st_mode)}, not {what}")
    return st


def check_regular(path: str | os.PathLike[str], *, error: type[NinError] = FileError) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), if it is a regular file; otherwise ``error`` saying what it is."""
    return _stat_as(path, stat.S_ISREG, "a regular file", error, None, None)


def check_dir(path: str | os.PathLike[str], *, error: type[NinError] = FileError, what: str = "folder",
              name: str | None = None, missing: str | None = None) -> Path:
    """``path`` if it is a directory (links followed); otherwise ``error`` saying what it is instead, naming it
    as ``name`` (default: the path); ``missing``: what to say when there is nothing there."""
    _stat_as(path, stat.S_ISDIR, f"a {what}", error, name, missing)
    return Path(path)


def open_regular(path: str | os.PathLike[str], *, error: type[NinError] = FileError) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file; otherwise ``error`` naming it.

    It is opened with ``O_NONBLOCK`` (a FIFO without a writer does not block the open), then checked with
    ``fstat`` on the open descriptor, so a file swapped between a check and the open cannot slip through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise error(f"{path}: {os_reason(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {kind(st.st_mode)}, not a regular file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int | None = None, *,
                 error: type[NinError] = FileError) -> bytes:
    """The bytes of regular file ``path``; more than ``limit`` bytes is ``error`` (read stops at limit + 1)."""
    with open_regular(path, error=error) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read it ({os_reason(e)})") from None
    if limit is not None and len(data) > limit:
        raise error(f"{path}: larger than the {limit:,} bytes allowed for it")
    return data


def read_regular_text(path: str | os.PathLike[str], limit: int | None = None, *,
                      error: type[NinError] = FileError) -> str:
    """:func:`read_regular` decoded as UTF-8; other bytes are ``error``."""
    data = read_regular(path, limit, error=error)
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike[str], limit: int | None = None, *, error: type[NinError] = FileError):
    """The JSON document in the regular file ``path`` (at most ``limit`` bytes): anything else, text that is not
    JSON included, is one ``error`` line naming the file."""
    import json

    text = read_regular_text(path, limit, error=error)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer of more than 4300 digits
        raise error(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None


class DirLock:
    """Exclusive ownership of folder ``path`` by this process, while held: an advisory ``flock`` on the
    folder itself (no lock file is written, so a refused command changes nothing). The kernel drops the
    lock when the process ends, however it ends, so a crash never leaves a stale lock behind."""

    def __init__(self, path: str | os.PathLike[str], *, error: type[NinError] = FileError,
                 busy: str = "in use by another process") -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise error(f"{path}: {os_reason(e)}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.release()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(f"{path}: {busy}") from None
            if e.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                return  # a file system without locks (some network mounts): held by no one, as before locks
            raise error(f"{path}: cannot lock it ({os_reason(e)})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
