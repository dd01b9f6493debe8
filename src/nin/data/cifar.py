"""CIFAR-10 and CIFAR-100 from the official "python version" archives (Krizhevsky, 2009).

Reading top to bottom:

1. :class:`CifarDataset` describes an archive as plain data; :data:`CIFAR` holds the two.
2. :func:`read_archive` reads the batches straight out of the ``.tar.gz`` without
   extracting anything to disk, so no member name can escape a directory; members
   with absolute or ``..`` paths, links or devices make the archive refused, and so
   do more than :data:`MAX_MEMBERS` members or a member declaring more bytes than a
   batch of the data set can hold (:attr:`CifarDataset.max_member`), before it is read.
   Each batch is a pickle, and pickles can run code: :class:`_BatchUnpickler`
   accepts only the globals a numpy array needs, and the result must be exactly
   a uint8 ``[N, 3072]`` array and N integer labels in range.
3. :func:`load` finds the archive (only in ``--data-dir`` / ``NIN_DATA_DIR`` when
   one is named, which must exist; else in the user cache), downloads it if missing
   (MD5-verified against the published sum, atomically), and keeps the decoded split
   as a uint8 tensor file next to it, keyed by the archive's size and modification
   time, so later runs skip the decoding.

Every problem is a :class:`~nin.data.DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import types
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from nin.data.idx import DataError, DownloadError, Split
from nin.data.sources import Opener, cache_dir, download_file, existing_file, save_cache_file, user_data_dir
from nin.files import open_regular, os_reason

CACHE_VERSION = 1
MAX_MEMBERS = 100  # the official archives hold 8 and 9; a tar of millions of tiny members is refused early
# The declared size of all members together: the official archives hold 178 and 185 MB.
MAX_CONTENT_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class CifarDataset:
    """One CIFAR archive: where its batches are, which label field to use, how many of each."""

    name: str
    archive: str  # file name of the .tar.gz
    md5: str | None  # published MD5 of the archive (None: not checked)
    folder: str  # the directory inside the archive
    batches: Mapping[str, tuple[str, ...]]  # split -> batch member names
    meta: str  # member holding the class names
    names_key: str  # key of the class names in the meta pickle
    label_key: str  # key of the labels in each batch
    counts: Mapping[str, int]
    num_classes: int
    mirrors: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
    image_shape: tuple[int, int, int] = (3, 32, 32)
    # The most bytes one member may declare: a CIFAR-10 batch of 10,000 images is 31 MB.
    max_member: int = 64 * 1024 * 1024


CIFAR10 = CifarDataset(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    batches=types.MappingProxyType({
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }),
    meta="batches.meta",
    names_key="label_names",
    label_key="labels",
    counts=types.MappingProxyType({"train": 50_000, "test": 10_000}),
    num_classes=10,
)

CIFAR100 = CifarDataset(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    batches=types.MappingProxyType({"train": ("train",), "test": ("test",)}),
    meta="meta",
    names_key="fine_label_names",
    label_key="fine_labels",
    counts=types.MappingProxyType({"train": 50_000, "test": 10_000}),
    num_classes=100,
    max_member=256 * 1024 * 1024,  # "train" holds all 50,000 training images: 155 MB
)

CIFAR: Mapping[str, CifarDataset] = types.MappingProxyType({s.name: s for s in (CIFAR10, CIFAR100)})


# --------------------------------------------------------------------------
# Reading an archive
# --------------------------------------------------------------------------


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return core.multiarray._reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What a protocol-2 pickle written by Python 3 calls to make bytes; only the latin-1 codec is allowed."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing the codec {encoding!r}")
    return text.encode("latin-1")


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, dicts, lists, strings and numbers, and nothing else."""

    _ALLOWED = {
        ("_codecs", "encode"): lambda: _latin1_encode,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        make = self._ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return make()


def unpickle_batch(data: bytes, source: str) -> dict[str, Any]:
    """A CIFAR batch pickle as a dict with str keys; anything else is a :class:`DataError`."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:  # (some of its messages span two lines)
        raise DataError(f"{source}: not a CIFAR batch: {' '.join(str(e).split())}") from None
    except Exception as e:  # a malformed pickle raises almost anything (EOFError, ValueError, KeyError, ...)
        raise DataError(f"{source}: corrupt pickle: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source}: not a CIFAR batch: a {type(obj).__name__}, expected a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _safe_members(tar: tarfile.TarFile, path: Path, spec: CifarDataset) -> dict[str, tarfile.TarInfo]:
    """The archive's members by name, each checked as its header is read (before the next is looked for,
    which would skip, that is decompress, its data): a safe path, a file or folder, a size within bounds."""
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for m in tar:  # lazily, header by header
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts:
            raise DataError(f"{path}: refusing an archive with the unsafe member path {m.name!r}")
        if not (m.isfile() or m.isdir()):
            raise DataError(f"{path}: refusing an archive with a link or special file: {m.name!r}")
        if m.size > spec.max_member:
            raise DataError(f"{path}: refusing an archive member of {m.size:,} bytes ({m.name!r}): more than the "
                            f"{spec.max_member:,} bytes a {spec.name} batch can need")
        total += m.size
        if total > MAX_CONTENT_BYTES:
            raise DataError(f"{path}: refusing an archive whose members declare more than {MAX_CONTENT_BYTES:,} "
                            f"bytes (a {spec.name} archive holds about 190 MB)")
        if len(members) == MAX_MEMBERS:
            raise DataError(f"{path}: refusing an archive of more than {MAX_MEMBERS} members "
                            f"(not a {spec.name} archive)")
        members[m.name.removeprefix("./")] = m
    return members


def read_archive(path: Path, spec: CifarDataset, split: str) -> Split:
    """Decode one split of a CIFAR python archive, in memory. Checks shapes, counts and label ranges.

    The archive must be a regular file; each member is checked before it is read (see :func:`_safe_members`),
    so memory is bounded by :attr:`CifarDataset.max_member`, whatever the archive claims or holds.
    """
    if split not in spec.batches:
        raise DataError(f"{spec.name} has no split {split!r}; known: {', '.join(spec.batches)}")
    try:
        with open_regular(path, error=DataError) as raw, tarfile.open(str(path), "r:gz", fileobj=raw) as tar:
            members = _safe_members(tar, path, spec)

            def read(member: str) -> dict[str, Any]:
                info = members.get(f"{spec.folder}/{member}")
                if info is None or not info.isfile():
                    raise DataError(f"{path}: no {spec.folder}/{member} in the archive (not a {spec.name} archive?)")
                f = tar.extractfile(info)
                assert f is not None  # a regular file
                return unpickle_batch(f.read(info.size), f"{path}:{info.name}")

            meta = read(spec.meta)
            batches = [(name, read(name)) for name in spec.batches[split]]
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:  # ValueError: a size past 2**63
        raise DataError(f"{path}: corrupt or truncated archive: {e or type(e).__name__}") from None

    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(f"{path}: {spec.meta} has no list of {spec.num_classes} {spec.names_key}")
    try:
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {spec.meta}: a class name is not UTF-8 text ({e})") from None
    images, labels = [], []
    for name, batch in batches:
        where = f"{path}:{spec.folder}/{name}"
        data, lab = batch.get("data"), batch.get(spec.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
        if not isinstance(lab, list) or len(lab) != len(data) or not all(isinstance(v, int) for v in lab):
            raise DataError(f"{where}: {spec.label_key!r} must be a list of {len(data)} integers")
        if lab and not 0 <= min(lab) <= max(lab) < spec.num_classes:
            raise DataError(f"{where}: labels must be in [0, {spec.num_classes}), found {min(lab)}..{max(lab)}")
        images.append(data)
        labels.append(np.asarray(lab, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images).reshape(-1, *spec.image_shape))
    y = torch.from_numpy(np.concatenate(labels))
    return Split(images=x, labels=y, classes=classes, images_path=path, labels_path=path)


def md5_file(path: Path) -> str:
    """The MD5 hex digest of regular file ``path``, read in chunks; anything else is a :class:`DataError`."""
    h = hashlib.md5()
    with open_regular(path, error=DataError) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: Path, spec: CifarDataset) -> None:
    """Raise :class:`DataError` unless the archive's MD5 is the published one (None in the spec: no check)."""
    if spec.md5 is None:
        return
    try:
        got = md5_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {os_reason(e)}") from None
    if got != spec.md5:
        raise DataError(f"{path}: checksum mismatch: expected MD5 {spec.md5}, got {got} "
                        "(the file is corrupt, truncated or a different archive)")


# --------------------------------------------------------------------------
# Finding, downloading and caching
# --------------------------------------------------------------------------


def find_archive(spec: CifarDataset, data_dir: str | os.PathLike[str] | None = None) -> tuple[Path | None, list[Path]]:
    """The archive's path if found, and the places looked: only the directory the user names (``data_dir``,
    else ``$NIN_DATA_DIR``; it must exist) when there is one, else the cache. Something at the archive's
    path that is not a regular file (a folder, a FIFO) is a :class:`DataError` naming it."""
    chosen = user_data_dir(data_dir)
    dirs = [chosen] if chosen is not None else [cache_dir(spec.name)]
    for d in dirs:
        if existing_file(d / spec.archive) is not None:
            return d / spec.archive, dirs
    return None, dirs


def _download(spec: CifarDataset, target: Path, opener: Opener, dirs: list[Path]) -> Path:
    def check(body: bytes, url: str) -> None:
        if spec.md5 is not None and hashlib.md5(body).hexdigest() != spec.md5:
            raise DataError(f"{url}: checksum mismatch: expected MD5 {spec.md5}")

    urls = [m.rstrip("/") + "/" + spec.archive for m in spec.mirrors]
    try:
        return download_file(urls, target / spec.archive, None, opener, check=check)
    except DownloadError as e:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(f"{spec.name} data not found: no {spec.archive} in {looked}, and the download failed "
                        f"({e}). To get it: put {spec.archive} (from {spec.mirrors[0]}) in a directory and pass "
                        "--data-dir DIR or set NIN_DATA_DIR=DIR") from None


def _cache_path(spec: CifarDataset, archive: Path, split: str, verified: bool) -> Path:
    st = archive.stat()
    # Size and both times: a rewritten archive gets a new status-change time even if its mtime was set back.
    ident = f"{CACHE_VERSION}|{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{verified}"
    key = hashlib.sha256(ident.encode()).hexdigest()
    return cache_dir(spec.name) / f"{split}-{key[:16]}.safetensors"


def _read_cache(file: Path, archive: Path, spec: CifarDataset) -> Split | None:
    """The split saved in ``file``, or None if it is unreadable or not what it should be."""
    try:
        with safe_open(str(file), "pt") as f:
            x, y = f.get_tensor("images"), f.get_tensor("labels")
            classes = tuple(json.loads((f.metadata() or {})["classes"]))
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, RecursionError):
        return None
    if (x.dtype != torch.uint8 or tuple(x.shape[1:]) != spec.image_shape or y.dtype != torch.int64
            or y.shape != x.shape[:1] or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < spec.num_classes)
            or len(classes) != spec.num_classes or not all(isinstance(c, str) for c in classes)):
        return None
    return Split(images=x, labels=y, classes=classes, images_path=archive, labels_path=archive)


def _write_cache(file: Path, split: Split) -> None:
    # A read-only cache directory only costs the decoding next time.
    save_cache_file(file, {"images": split.images, "labels": split.labels},
                    {"classes": json.dumps(list(split.classes)), "version": str(CACHE_VERSION)})


def load(
    dataset: str | CifarDataset,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    *,
    opener: Opener = urllib.request.urlopen,
    use_cache: bool = True,
) -> Split:
    """Find (or fetch), check and load one CIFAR split as uint8 images [N, 3, 32, 32] and int64 labels.

    ``verify`` checks the archive's MD5 against the published one before it is first decoded.
    """
    spec = CIFAR[dataset] if isinstance(dataset, str) else dataset
    path, dirs = find_archive(spec, data_dir)
    if path is None:
        if not download:
            looked = ", ".join(str(d) for d in dirs)
            raise DataError(f"{spec.name} data not found: no {spec.archive} in {looked} (downloading was disabled). "
                            f"To get it: download {spec.mirrors[0]}{spec.archive} into a directory and pass "
                            "--data-dir DIR or set NIN_DATA_DIR=DIR")
        path = _download(spec, dirs[0], opener, dirs)  # the user's directory, else the cache
    cached = _cache_path(spec, path, split, verify) if use_cache else None
    if cached is not None and cached.is_file():
        hit = _read_cache(cached, path, spec)
        if hit is not None:
            return hit
    if verify:
        check_md5(path, spec)
    loaded = read_archive(path, spec, split)
    expected = spec.counts.get(split)
    if verify and expected is not None and len(loaded.images) != expected:
        raise DataError(f"{path}: {len(loaded.images)} {split} images, expected {expected} for {spec.name}")
    if cached is not None:
        _write_cache(cached, loaded)
    return loaded
