"""Finding, fetching and loading the IDX data sets (Fashion-MNIST, MNIST).

:func:`find_files` looks in the directory the user names (the only place looked when there is one), else
the user cache, then the Debian package's directory; missing files are downloaded from the official
mirrors, checked in a stream before anything is kept, and written atomically. :func:`load` checks both
files' headers against the spec before reading any data, then returns one :class:`~nin.data.idx.Split`.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from nin.atomic import WriteError, atomic_path, write_bytes
from nin.data.idx import (
    DataError,
    DownloadError,
    IdxDataset,
    IdxStream,
    NotFoundError,
    Split,
    check_data,
    get_dataset,
    read_data,
    read_header,
    split_files,
)
from nin.files import check_dir, kind, os_reason

MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


Opener = Callable[..., Any]
"""A ``urllib.request.urlopen``-like callable: ``opener(url, timeout=...)``
returns a context manager whose ``read(n)`` yields the body."""


def cache_dir(dataset: str | IdxDataset) -> Path:
    """``$XDG_CACHE_HOME/nin/<name>``, or ``~/.cache/nin/<name>`` without it (any data set's name)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nin" / (dataset.name if isinstance(dataset, IdxDataset) else dataset)


def debian_dirs(spec: IdxDataset) -> list[Path]:
    """Directories holding the spec's files according to its Debian package.

    Asks ``dpkg -L`` when dpkg exists, then falls back to ``spec.debian_dir``.
    """
    dirs: list[Path] = []
    wanted = {n for f in spec.filenames for n in (f, f + ".gz")}
    if spec.debian_package and shutil.which("dpkg"):
        try:
            listing = subprocess.run(
                ["dpkg", "-L", spec.debian_package],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            path = Path(line.strip())
            if path.name in wanted and path.parent not in dirs:
                dirs.append(path.parent)
    if spec.debian_dir is not None and spec.debian_dir not in dirs:
        dirs.append(spec.debian_dir)
    return dirs


def user_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The data directory the user named: ``data_dir`` if given, else ``$NIN_DATA_DIR``; None if neither.

    A named directory must exist and be a directory: otherwise a :class:`DataError` naming it and saying
    what it is, so a mistyped name is never silently replaced by data found elsewhere.
    """
    if data_dir is not None:
        path, named = Path(data_dir), f"data directory {data_dir}"
    elif os.environ.get("NIN_DATA_DIR"):
        path = Path(os.environ["NIN_DATA_DIR"])
        named = f"NIN_DATA_DIR={path}"
    else:
        return None
    return check_dir(path, error=DataError, name=named,
                     missing="no such directory (create it, or name the directory holding the data)")


def search_dirs(
    dataset: str | IdxDataset, data_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Directories searched for data files, in order of preference.

    Only the user's directory when one is named (``data_dir``, else ``$NIN_DATA_DIR``; see
    :func:`user_data_dir`); otherwise the user cache, then the Debian package's directories.
    """
    spec = get_dataset(dataset)
    chosen = user_data_dir(data_dir)
    if chosen is not None:
        return [chosen]
    dirs: list[Path] = []
    for candidate in [cache_dir(spec), *debian_dirs(spec)]:
        if candidate not in dirs:
            dirs.append(candidate)
    return dirs


def existing_file(path: Path) -> Path | None:
    """``path`` if it is a regular file (links followed), None if nothing is there.

    Anything else at ``path`` (a directory, a FIFO, a device, a link to nothing, a loop of links) is a
    :class:`DataError` naming it: a file the user may have meant is never silently passed over.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        return None
    except OSError as exc:
        raise DataError(f"{path}: {os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: {kind(st.st_mode)}, not a regular file")
    return path


def find_in(directory: Path, filename: str) -> Path | None:
    """``directory/filename`` or ``directory/filename.gz``, the first that exists; it must be a regular file."""
    for candidate in (directory / filename, directory / (filename + ".gz")):
        if existing_file(candidate) is not None:
            return candidate
    return None


def download_file(
    urls: Sequence[str],
    dest: Path,
    sha256: str | None,
    opener: Opener = urllib.request.urlopen,
    timeout: float = 30.0,
    check: Callable[[bytes, str], None] | None = None,
) -> Path:
    """Fetch the first URL that works into ``dest``, verified and atomically.

    By default the body may be gzip or raw; the SHA-256 of the decompressed
    content must equal ``sha256`` and the content must parse as IDX before
    anything is written. ``check(body, url)`` replaces that test for other
    formats (it raises :class:`DataError` for a bad body). The file is written
    to a temporary name in ``dest``'s directory and moved into place with :func:`os.replace`; an existing ``dest`` is
    never overwritten. Raises :class:`DownloadError` when no URL could be
    fetched, and :class:`DataError` when a fetched body was bad.
    """
    if dest.exists():
        return dest
    failures: list[str] = []
    content_error: DataError | None = None
    for url in urls:
        try:
            with opener(url, timeout=timeout) as response:
                body = response.read(MAX_DOWNLOAD_BYTES + 1)
        except (OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            continue
        try:
            if len(body) > MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url}: larger than {MAX_DOWNLOAD_BYTES} bytes")
            (check or _check_idx_body(sha256))(body, url)
        except DataError as exc:
            failures.append(str(exc))
            content_error = exc
            continue
        write_atomically(dest, body)
        return dest
    reasons = "; ".join(failures) or "no URLs to try"
    if content_error is not None:
        raise DataError(f"{dest.name}: download failed: {reasons}") from content_error
    raise DownloadError(f"{dest.name}: download failed: {reasons}")


def _check_idx_body(sha256: str | None, shape: tuple[int, ...] | None = None) -> Callable[[bytes, str], None]:
    """A ``check`` for :func:`download_file`: the body (raw or gzip) is an IDX file of ``shape`` (None: any
    shape within :data:`MAX_IDX_BYTES`) with SHA-256 ``sha256``; decompressed in a stream, never past that."""
    def check(body: bytes, url: str) -> None:
        stream = IdxStream(io.BytesIO(body), url)
        dims = read_header(stream)
        _check_shape(dims, shape, url)
        check_data(stream, dims, sha256=sha256)

    return check


def write_atomically(dest: Path, body: bytes) -> None:
    """Write ``body`` to ``dest`` via a temporary file (:mod:`nin.atomic`); keep an existing ``dest``."""
    try:
        write_bytes(dest, body, overwrite=False)
    except WriteError as exc:
        raise DataError(str(exc)) from exc


def save_cache_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Write a safetensors cache file via a temporary file and :func:`os.replace` (an old or corrupt file is
    replaced whole, never half-written). False when it cannot be written: a cache only saves time."""
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return True
    except (OSError, SafetensorError):
        return False


def how_to_get(spec: IdxDataset, missing: Iterable[str], dirs: Sequence[Path]) -> str:
    """One line telling the user every way to obtain the missing files."""
    names = ", ".join(f"{name}[.gz]" for name in missing)
    looked = ", ".join(str(d) for d in dirs)
    ways = [f"pass --data-dir DIR or set NIN_DATA_DIR=DIR, with DIR holding {names}"]
    if spec.debian_package:
        ways.append(f"run 'apt-get install {spec.debian_package}'")
    ways.append("download the .gz files from " + " or ".join(spec.mirrors))
    return (
        f"{spec.name} data not found: no {names} in {looked}. "
        f"To get it: {'; or '.join(ways)}"
    )


def find_files(
    dataset: str | IdxDataset,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    splits: Iterable[str] | None = None,
    opener: Opener = urllib.request.urlopen,
    timeout: float = 30.0,
) -> dict[str, Path]:
    """Locate the files of ``splits`` (default: all), downloading any missing ones.

    Each file may be stored as ``name`` or ``name.gz`` (the first is preferred; whichever exists must
    be a regular file). A directory the user names (``data_dir``, else ``$NIN_DATA_DIR``) must exist,
    and is then the only one searched; without one, the user cache dir, then the Debian package's
    directory. Missing files are downloaded into the user's directory if there is one, else into the
    cache; with ``download=False`` they are a :class:`NotFoundError`. Returns a mapping from file
    name (without ``.gz``) to its path.
    """
    spec = get_dataset(dataset)
    wanted = [name for split in (splits or spec.files) for name in split_files(spec, split)]
    chosen = user_data_dir(data_dir)
    dirs = search_dirs(spec, chosen)
    found: dict[str, Path] = {}
    for name in wanted:
        path = next((p for d in dirs if (p := find_in(d, name)) is not None), None)
        if path is not None:
            found[name] = path
    missing = [name for name in wanted if name not in found]
    if not missing:
        return found
    if not download:
        raise NotFoundError(how_to_get(spec, missing, dirs) + " (downloading was disabled)")
    target = chosen or cache_dir(spec)
    for name in missing:
        urls = [mirror.rstrip("/") + "/" + name + ".gz" for mirror in spec.mirrors]
        check = _check_idx_body(spec.sha256.get(name), expected_shape(spec, name))
        try:
            found[name] = download_file(
                urls, target / (name + ".gz"), spec.sha256.get(name), opener, timeout, check
            )
        except DownloadError as exc:
            raise DataError(f"{how_to_get(spec, missing, dirs)} ({exc})") from exc
    return found


def expected_shape(spec: IdxDataset, name: str) -> tuple[int, ...] | None:
    """The shape ``spec`` expects of its file ``name``: (N, H, W) images or (N,) labels; None if it has no count."""
    for split, (images, labels) in spec.files.items():
        count = spec.counts.get(split)
        if count is not None and name == images:
            return (count, *spec.image_shape[1:])
        if count is not None and name == labels:
            return (count,)
    return None


def _check_shape(dims: tuple[int, ...], shape: tuple[int, ...] | None, source: str | os.PathLike[str]) -> None:
    if shape is not None and dims != shape:
        raise DataError(f"{source}: the IDX header declares shape {dims}, expected {shape}")


def check_file(spec: IdxDataset, name: str, path: str | os.PathLike[str]) -> None:
    """Check data file ``name`` of ``spec`` at ``path`` in a stream: its header against the shape the spec
    expects, its length, and the SHA-256 of its decompressed bytes. Memory is one chunk, whatever the file."""
    with IdxStream.open(path) as stream:
        dims = read_header(stream)
        _check_shape(dims, expected_shape(spec, name), path)
        check_data(stream, dims, sha256=spec.sha256.get(name))


def _check_split_dims(spec: IdxDataset, split: str, images: tuple[Path, tuple[int, ...]],
                      labels: tuple[Path, tuple[int, ...]]) -> None:
    """The headers' dimensions against each other and the spec, before any data is read."""
    (images_path, images_dims), (labels_path, labels_dims) = images, labels
    _, height, width = spec.image_shape
    if len(images_dims) != 3 or images_dims[1:] != (height, width):
        raise DataError(
            f"{images_path}: images have shape {images_dims}, expected (N, {height}, {width})"
        )
    if len(labels_dims) != 1:
        raise DataError(f"{labels_path}: labels have shape {labels_dims}, expected (N,)")
    if images_dims[0] != labels_dims[0]:
        raise DataError(
            f"{images_path}: {images_dims[0]} images but {labels_path} has {labels_dims[0]} labels"
        )
    expected = spec.counts.get(split)
    if expected is not None and images_dims[0] != expected:
        raise DataError(
            f"{images_path}: {images_dims[0]} images, expected {expected} for "
            f"{spec.name} {split}"
        )


def load(
    dataset: str | IdxDataset,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    *,
    opener: Opener = urllib.request.urlopen,
) -> Split:
    """Find (or fetch), check and load one split as a :class:`Split`.

    ``verify`` checks each file's SHA-256 against the spec (files whose
    digest is None in the spec are not checked). Shapes, counts and label
    range are always checked; shapes and counts from the headers, before any
    data is read, so memory is what the spec's counts need, whatever a file claims.
    """
    spec = get_dataset(dataset)
    images_name, labels_name = split_files(spec, split)
    paths = find_files(spec, data_dir, download, splits=[split], opener=opener)
    images_path, labels_path = paths[images_name], paths[labels_name]
    with IdxStream.open(images_path) as images_in, IdxStream.open(labels_path) as labels_in:
        images_dims, labels_dims = read_header(images_in), read_header(labels_in)
        _check_split_dims(spec, split, (images_path, images_dims), (labels_path, labels_dims))
        images = read_data(images_in, images_dims, sha256=spec.sha256.get(images_name) if verify else None)
        labels = read_data(labels_in, labels_dims, sha256=spec.sha256.get(labels_name) if verify else None)

    if labels.size and int(labels.max()) >= len(spec.classes):
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range for "
            f"{len(spec.classes)} classes"
        )
    channels, height, width = spec.image_shape
    return Split(
        images=torch.from_numpy(images.reshape(len(images), channels, height, width)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=spec.classes,
        images_path=images_path,
        labels_path=labels_path,
    )


def load_split(dataset: str | IdxDataset, split: str, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (uint8 images [N, C, H, W] contiguous, int64 labels [N]).

    Takes the arguments of :func:`load`, which says where files are looked for and what is checked.
    """
    loaded = load(dataset, split, *args, **kwargs)
    return loaded.images, loaded.labels
