"""Output files written whole or not at all.

:func:`atomic_paths` hands out temporary names in each destination's folder. When
the block ends without an error every temporary file is flushed to disk, and only
then renamed over its destination, so a reader never sees half a file and an
existing file is either kept as it was or replaced whole. On any error the
temporary files, and the folders that were made for them, are removed.

The rule for outputs a user names (``--out``): an existing file is never replaced unless the user
says so (``--force``). :func:`refuse_existing` checks before any work is done, and ``exclusive=True``
places each file with a hard link, which fails if the destination appeared meanwhile, so even a
race with another process cannot overwrite it.

A file system that refuses (a full disk, a folder that is a file, a read-only
mount) raises one :class:`WriteError` naming the destination: a one-line
:class:`~nin.errors.NinError` on the command line, and still an :class:`OSError`
for code that handles those.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nin.errors import NinError


class WriteError(NinError, OSError):
    """A file could not be written; the message names it (``path``) and says why (``reason``)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: cannot write: {reason}")
        self.path, self.reason = Path(path), reason


class OutputExists(WriteError):
    """An output the user named exists already, and replacing it was not asked for."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "already exists; pass --force to replace it, or choose another --out")
        self.errno = errno.EEXIST


def refuse_existing(*paths: str | os.PathLike[str], force: bool = False) -> None:
    """:class:`OutputExists` for the first of ``paths`` that exists (unless ``force``); a folder in the place of
    an output file is refused even with ``force``."""
    for p in map(Path, paths):
        if p.is_dir():
            raise WriteError(p, "is a directory, not a file")
        if not force and os.path.lexists(p):
            raise OutputExists(p)


def write_error(path: str | os.PathLike[str], exc: OSError) -> WriteError:
    """``exc`` as a :class:`WriteError` about ``path`` (a WriteError is passed through unchanged)."""
    if isinstance(exc, WriteError):
        return exc
    why = exc.strerror or str(exc) or type(exc).__name__
    err = WriteError(path, why[:1].lower() + why[1:])
    err.errno = exc.errno
    return err


def make_dirs(path: Path) -> list[Path]:
    """Create folder ``path`` and its missing parents; return the ones created, outermost first."""
    missing = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{p} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_dirs(created: list[Path]) -> None:
    """Remove folders made by :func:`make_dirs`, innermost first, as long as they are empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_new(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest`` only if ``dest`` does not exist (:class:`OutputExists` otherwise)."""
    try:
        os.link(tmp, dest)  # creates dest only if there is none: no check-then-write race
        return
    except FileExistsError:
        raise OutputExists(dest) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if os.path.lexists(dest):  # a file system without hard links: check, then rename
        raise OutputExists(dest)
    os.replace(tmp, dest)


@contextmanager
def atomic_paths(*dests: str | os.PathLike[str], overwrite: bool = True,
                 exclusive: bool = False) -> Iterator[list[Path]]:
    """Temporary paths for ``dests``; each must be written inside the block.

    On success all of them are synced to disk first, then moved into place (with
    ``overwrite=False`` a destination that exists by then is kept and the new file dropped;
    with ``exclusive=True`` it is :class:`OutputExists`, and none of the files is placed).
    Missing parent folders are created, and removed again on failure.
    """
    targets = [Path(d) for d in dests]
    created: list[Path] = []
    temps: list[Path] = []
    placed: list[Path] = []
    done = False
    current: Path | None = targets[0]
    try:
        for dest in targets:
            current = dest
            created += make_dirs(dest.parent)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
            temps.append(tmp)
        current = targets[0] if len(targets) == 1 else None  # the block writes: which file failed is in the error
        yield list(temps)
        for dest, tmp in zip(targets, temps):
            current = dest
            _fsync(tmp)
        for dest, tmp in zip(targets, temps):
            current = dest
            if exclusive:
                _place_new(tmp, dest)
                placed.append(dest)
            elif overwrite or not dest.exists():
                existed = dest.exists()
                os.replace(tmp, dest)
                if not existed:
                    placed.append(dest)
        done = True
    except WriteError as e:
        for tmp, dest in zip(temps, targets):
            if e.path == tmp:  # written through another atomic write: name the file the user asked for
                err = WriteError(dest, e.reason)
                err.errno = e.errno
                raise err from e
        raise
    except OSError as e:
        named = {str(t): d for t, d in zip(temps, targets)}.get(str(e.filename)) if e.filename else None
        raise write_error(named or current or targets[0].parent, e) from e
    finally:
        for tmp in temps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if not done:
            for dest in placed:  # a later file failed: the new files placed before it go too
                try:
                    dest.unlink(missing_ok=True)
                except OSError:
                    pass
            remove_dirs(created)


@contextmanager
def atomic_path(dest: str | os.PathLike[str], *, overwrite: bool = True, exclusive: bool = False) -> Iterator[Path]:
    """:func:`atomic_paths` for one file."""
    with atomic_paths(dest, overwrite=overwrite, exclusive=exclusive) as (tmp,):
        yield tmp


def write_bytes(dest: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``dest`` whole or not at all (see :func:`atomic_paths`)."""
    with atomic_path(dest, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(dest)


def write_text(dest: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``dest`` whole or not at all."""
    return write_bytes(dest, text.encode(), overwrite=overwrite)
