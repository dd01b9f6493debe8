"""Image-folder data sets ("bring your own images"): one sub-folder per class.

Layout::

    ROOT/
        cat/                 one folder per class; the folder name is the class name
            001.png
            more/002.jpg     folders inside a class folder are searched too
        dog/
            ...

Image files are recognised by extension (see :data:`IMAGE_EXTENSIONS`, any
case); names starting with ``.`` are ignored at every level, as are files with
other extensions. Symbolic links to files are read; symbolic links to folders
inside a class folder are not followed. Classes are the sorted class folder
names, so label ``i`` means ``classes[i]``, unless the caller passes
``classes`` (a test folder must use the train folder's classes). Images are
ordered by label, then by relative path, so a load is deterministic and does
not depend on the number of decoding threads.

Every image is decoded once with Pillow (:func:`nin.data.images.decode_image`), after two checks
that need no pixels: the file must be a regular file (opened without blocking, so a
FIFO or a device is refused, never read), and its header must declare at most
``max_pixels`` pixels (:data:`MAX_PIXELS` by default), so memory is bounded by the
cap, not by what a file claims. Then the EXIF
orientation is applied, transparency is composited on white, 16-bit and float
greyscale are scaled to 0-255, the image is converted to ``L`` or ``RGB`` and
resized to (H, W), either covering the target and centre-cropping
(``fit="crop"``) or stretching (``fit="stretch"``). The result is one uint8
tensor [N, C, H, W] in a :class:`FolderSplit`.

The cache: with ``cache_dir`` the decoded result is stored as
``cache_dir/<key>.safetensors``. The key is a SHA-256 over the cache format
version, the Pillow version, the decoding settings, the ``classes`` argument and,
for every candidate image file, its relative path, size, modification and
status-change times in nanoseconds and inode number. Editing, replacing, adding,
removing or renaming a file gives a new key, even when the new file has the old
size and its modification time was set back (the status-change time cannot be),
so a stale cache is never used (old cache files are left for the user to
delete); moving the whole folder within a file system keeps it. A cache file that cannot be read or
does not match the folder is ignored and rewritten, and a cache that cannot be
written is not an error. Files are written to a temporary name and moved into
place, so a crash never leaves a half-written cache behind.

Every problem is a :class:`nin.data.DataError` with a one-line message naming
the file or folder. Nothing is printed: files left out with
``on_error="skip"`` are returned in :attr:`FolderSplit.skipped`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import PIL
import torch
from safetensors import safe_open

from nin.data.idx import DataError
from nin.data.images import DECODE_ERRORS, _decode_reason, decode_image, pixel_cap
from nin.data.sources import save_cache_file
from nin.files import check_dir, os_reason

FORMAT_VERSION = 1
CACHE_FORMAT = "nin-image-folder"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SKIP_HINT = "pass --skip-bad-images to leave such files out"
MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class FolderSplit:
    """Decoded images of an image folder (or part of one, see :func:`split_folder`).

    ``files[i]`` is the path of ``images[i]`` relative to ``root`` with ``/``
    separators; ``skipped`` holds (relative path, reason) for each file left
    out because it could not be decoded. Two splits are equal when all their
    fields are, tensors compared by value.
    """

    images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]  # label i is classes[i]
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    root: Path

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FolderSplit):
            return NotImplemented
        return (
            (self.classes, self.files, self.skipped, self.root)
            == (other.classes, other.files, other.skipped, other.root)
            and torch.equal(self.labels, other.labels)
            and self.images.shape == other.images.shape
            and torch.equal(self.images, other.images)
        )

    def __hash__(self) -> int:
        return hash((self.classes, self.files, self.skipped, self.root))


class _Candidate(NamedTuple):
    """An image file found in the folder, before decoding."""

    rel: str  # path relative to the root, "/"-separated
    label: int
    size: int  # bytes; -1 when the file cannot be stat'ed (decoding then reports it)
    mtime_ns: int
    ctime_ns: int  # status change time: set by the file system on every write, whatever mtime is made to say
    inode: int  # a file replaced by another (written elsewhere and renamed over it) has a new one


# --------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_root(root: Path) -> None:
    """A :class:`DataError` naming ``root`` unless it is a folder (links followed), saying what it is instead."""
    check_dir(root, error=DataError, what="folder (expected ROOT/CLASS/IMAGE files)",
              missing="image folder does not exist")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError as exc:  # a loop of symbolic links, say
        raise DataError(f"{entry.path}: {os_reason(exc)}") from None


def _class_folders(root: Path) -> list[str]:
    """The sorted names of the visible sub-folders of ``root``."""
    _check_root(root)
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise DataError(f"{root}: cannot list folder: {exc.strerror or exc}") from exc
    names = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    if not names:
        loose = any(e.is_file() and _is_image_name(e.name) for e in entries)
        hint = "; images directly in it are not used, " if loose else "; "
        raise DataError(f"{root}: no class sub-folders{hint}put the images in one sub-folder per class")
    return names


def _resolve_classes(root: Path, found: Sequence[str], classes: Sequence[str] | None) -> tuple[str, ...]:
    """The class order to use: ``classes`` if given (it must name exactly the folders found), else ``found``."""
    if classes is None:
        return tuple(found)
    if isinstance(classes, str):
        raise DataError(f"classes must be a sequence of class names, not the string {classes!r}")
    wanted = tuple(str(c) for c in classes)
    duplicates = sorted({c for c in wanted if wanted.count(c) > 1})
    if duplicates:
        raise DataError(f"classes: duplicate class names: {', '.join(duplicates)}")
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing or extra:
        parts = [f"missing class folders: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected class folders: {', '.join(extra)}"] if extra else []
        raise DataError(f"{root}: class folders do not match the expected classes; {'; '.join(parts)}")
    return wanted


def _raise_listing_error(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot list folder: {exc.strerror or exc}") from exc


def _stat(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1, -1
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _scan_class(root: Path, name: str, label: int) -> list[_Candidate]:
    """The image files in one class folder and below it, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root / name, onerror=_raise_listing_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if _is_image_name(filename):
                path = os.path.join(dirpath, filename)
                rel = Path(os.path.relpath(path, root)).as_posix()
                found.append(_Candidate(rel, label, *_stat(path)))
    return sorted(found)


def _scan(root: Path, classes: Sequence[str]) -> list[_Candidate]:
    """All image files, by label then relative path; every class folder must hold at least one."""
    per_class = [_scan_class(root, name, label) for label, name in enumerate(classes)]
    if not any(per_class):
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{root}: no image files in any class folder (looked for {extensions})")
    empty = [name for name, files in zip(classes, per_class) if not files]
    if len(empty) == 1:
        raise DataError(f"{root / empty[0]}: class folder has no image files")
    if empty:
        raise DataError(f"{root}: class folders with no image files: {', '.join(empty)}")
    return [c for files in per_class for c in files]


def _bad_image_error(root: Path, rel: str, reason: str) -> DataError:
    return DataError(f"{root / rel}: {reason}; {SKIP_HINT}")


# --------------------------------------------------------------------------
# Decoding the folder
# --------------------------------------------------------------------------


def _decode_all(
    root: Path, candidates: Sequence[_Candidate], channels: int, size: tuple[int, int], fit: str,
    on_error: str, workers: int, max_pixels: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Decode every candidate (in ``workers`` threads); returns images, labels, files and skipped files."""
    out = np.empty((len(candidates), channels, *size), dtype=np.uint8)

    def decode_into(index: int) -> str | None:
        try:
            out[index] = decode_image(root / candidates[index].rel, channels, size, fit, max_pixels)
        except DECODE_ERRORS as exc:
            return _decode_reason(exc)
        return None

    def reasons(results: Iterable[str | None]) -> list[str | None]:
        collected = []
        for candidate, reason in zip(candidates, results):
            if reason is not None and on_error == "fail":
                raise _bad_image_error(root, candidate.rel, reason)
            collected.append(reason)
        return collected

    if workers == 1:
        found = reasons(map(decode_into, range(len(candidates))))
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nin-decode")
        try:
            found = reasons(pool.map(decode_into, range(len(candidates))))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, do not decode the rest

    keep = [i for i, reason in enumerate(found) if reason is None]
    skipped = tuple((c.rel, r) for c, r in zip(candidates, found) if r is not None)
    if not keep:
        first, reason = skipped[0]
        raise DataError(f"{root}: none of the {len(candidates)} image files could be decoded ({first}: {reason})")
    images = torch.from_numpy(out if len(keep) == len(candidates) else out[keep])
    labels = torch.tensor([candidates[i].label for i in keep], dtype=torch.int64)
    return images, labels, tuple(candidates[i].rel for i in keep), skipped


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


def _cache_key(
    candidates: Sequence[_Candidate], channels: int, size: tuple[int, int], fit: str, classes: Sequence[str] | None,
    max_pixels: int,
) -> str:
    """SHA-256 over everything the decoded result depends on."""
    description = {
        "format": CACHE_FORMAT,
        "version": FORMAT_VERSION,
        "pillow": PIL.__version__,
        "channels": channels,
        "size": list(size),
        "fit": fit,
        "classes": None if classes is None else list(classes),
        "max_pixels": max_pixels,  # which files are refused (listed as skipped) depends on it
        "files": [[c.rel, c.size, c.mtime_ns, c.ctime_ns, c.inode] for c in candidates],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_cache(
    path: Path, classes: tuple[str, ...], candidates: Sequence[_Candidate], channels: int, size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple[tuple[str, str], ...]] | None:
    """The cached images, labels, files and skipped files; None when missing, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if set(f.keys()) != {"images", "labels"}:
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != str(FORMAT_VERSION):
            return None
        files = tuple(str(f) for f in json.loads(meta["files"]))
        skipped = tuple((str(rel), str(reason)) for rel, reason in json.loads(meta["skipped"]))
        cached_classes = tuple(json.loads(meta["classes"]))
    except Exception:  # noqa: BLE001 - a bad cache is never fatal, whatever safetensors or json raise
        return None
    label_of = {c.rel: c.label for c in candidates}
    consistent = (
        cached_classes == classes
        and images.dtype == torch.uint8
        and tuple(images.shape) == (len(files), channels, *size)
        and labels.dtype == torch.int64
        and tuple(labels.shape) == (len(files),)
        and sorted([*files, *(rel for rel, _ in skipped)]) == sorted(label_of)
        and labels.tolist() == [label_of[f] for f in files]
    )
    return (images.contiguous(), labels, files, skipped) if consistent else None


def _write_cache(path: Path, split: FolderSplit) -> None:
    """Store ``split`` at ``path`` atomically; failure to write is silently ignored."""
    metadata = {
        "format": CACHE_FORMAT,
        "version": str(FORMAT_VERSION),
        "classes": json.dumps(list(split.classes)),
        "files": json.dumps(list(split.files)),
        "skipped": json.dumps([list(s) for s in split.skipped]),
    }
    save_cache_file(path, {"images": split.images, "labels": split.labels}, metadata)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _check_options(channels: int, size: tuple[int, int], on_error: str, fit: str, workers: int | None) -> int:
    """Validate the decoding options; returns the number of threads to use."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), not {channels!r}")
    if (
        not isinstance(size, Sequence) or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise DataError(f"size must be two positive integers (height, width), not {size!r}")
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if fit not in ("crop", "stretch"):
        raise DataError(f"fit must be 'crop' or 'stretch', not {fit!r}")
    if workers is None:
        return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise DataError(f"workers must be a positive integer, not {workers!r}")
    return workers


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    channels: int,
    size: tuple[int, int],
    classes: Sequence[str] | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    fit: Literal["crop", "stretch"] = "crop",
    cache_dir: Path | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
) -> FolderSplit:
    """Load ``root/CLASS/...`` images as uint8 [N, channels, H, W] with ``size == (H, W)``.

    ``classes`` fixes the class names and their order (the folder must have
    exactly these class folders). A file that cannot be decoded is a
    :class:`DataError` with ``on_error="fail"`` and is left out and listed in
    ``skipped`` with ``on_error="skip"``. ``cache_dir`` stores and reuses the
    decoded result (see the module docstring); ``workers`` is the number of
    decoding threads (default: the CPU count, at most 8). An image whose header
    declares more than ``max_pixels`` pixels (None: :data:`MAX_PIXELS`) is refused
    before it is decoded, as a file that cannot be decoded is. A ``root`` that is
    missing or not a folder is a :class:`DataError` naming it.
    """
    threads = _check_options(channels, size, on_error, fit, workers)
    cap = pixel_cap(max_pixels)
    size = (int(size[0]), int(size[1]))
    root = Path(root).expanduser()
    names = _resolve_classes(root, _class_folders(root), classes)
    candidates = _scan(root, names)

    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{_cache_key(candidates, channels, size, fit, classes, cap)}.safetensors"
        cached = _read_cache(cache_path, names, candidates, channels, size)
        if cached is not None:
            images, labels, files, skipped = cached
            if skipped and on_error == "fail":
                raise _bad_image_error(root, *skipped[0])
            return FolderSplit(images, labels, names, files, skipped, root)

    images, labels, files, skipped = _decode_all(root, candidates, channels, size, fit, on_error, threads, cap)
    split = FolderSplit(images, labels, names, files, skipped, root)
    if cache_path is not None:
        _write_cache(cache_path, split)
    return split


def _test_count(n: int, test_fraction: float) -> int:
    """How many of a class's ``n`` images go to the test part."""
    if n < 2:
        return 0  # a lone image is more useful for training
    return min(max(round(test_fraction * n), 1), n - 1)


def _subset(split: FolderSplit, indices: list[int]) -> FolderSplit:
    index = torch.tensor(indices, dtype=torch.int64)
    return FolderSplit(
        images=split.images.index_select(0, index).contiguous(),
        labels=split.labels.index_select(0, index),
        classes=split.classes,
        files=tuple(split.files[i] for i in indices),
        skipped=split.skipped,
        root=split.root,
    )


def split_folder(split: FolderSplit, test_fraction: float, seed: int) -> tuple[FolderSplit, FolderSplit]:
    """Split into (train, test), stratified by class and reproducible for a ``seed``.

    Each class with ``n >= 2`` images puts ``round(test_fraction * n)`` of them,
    but at least 1 and at most ``n - 1``, in test; a class with one image keeps
    it in train. Both parts keep the original order and the original
    ``skipped`` list.
    """
    if (
        isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
        or not math.isfinite(test_fraction) or not 0 < test_fraction < 1
    ):
        raise DataError(f"test fraction must be between 0 and 1 (exclusive), not {test_fraction!r}")
    generator = torch.Generator().manual_seed(int(seed))
    test: list[int] = []
    for label in range(len(split.classes)):
        members = (split.labels == label).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        test += order[: _test_count(len(members), test_fraction)].tolist()
    if not test:
        raise DataError(f"{split.root}: cannot split off a test set: no class has 2 or more images")
    chosen = set(test)
    train = [i for i in range(len(split.files)) if i not in chosen]
    return _subset(split, train), _subset(split, sorted(test))
