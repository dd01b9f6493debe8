"""Image classification data sets stored as IDX files (Fashion-MNIST, MNIST).

Reading top to bottom:

1. :func:`read_idx` turns one IDX file (raw or gzip) into a numpy array and
   rejects anything that is not exactly a well-formed IDX file.
2. :class:`IdxDataset` describes a data set as plain data; :data:`DATASETS`
   holds the known ones.
3. :func:`find_files` locates the files on disk (``--data-dir`` /
   ``NIN_DATA_DIR``, the user cache, the Debian package) and downloads what is
   missing, atomically and checksum-verified.
4. :func:`load_split` returns one split as tensors ready for training.

Every problem with the data is reported as a :class:`DataError`, whose message
names the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import types
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from nin.atomic import WriteError, atomic_path, write_bytes
from nin.errors import NinError


class DataError(NinError):
    """A data file is missing, unreadable, corrupt or not what was expected."""


class DownloadError(DataError):
    """No mirror could be reached; the data may still be obtained another way."""


# --------------------------------------------------------------------------
# Reading IDX files
# --------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE = 0x08
IDX_TYPE_NAMES = types.MappingProxyType(
    {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16",
     0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
)
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


def decompress_if_gzip(raw: bytes, source: str | os.PathLike[str]) -> bytes:
    """Return ``raw`` gunzipped if it starts with the gzip magic, else unchanged.

    A truncated stream, a bad CRC or garbled deflate data is a :class:`DataError`.
    """
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupt gzip data: {exc or type(exc).__name__}") from exc


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole file into memory, decompressing it if it is gzip."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return decompress_if_gzip(raw, path)


def parse_idx(data: bytes, source: str | os.PathLike[str]) -> np.ndarray:
    """Parse decompressed IDX bytes into a writable uint8 array of the declared shape.

    ``source`` only names the data in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{source}: not an IDX file: only {len(data)} bytes long")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source}: not an IDX file: magic starts with {data[0]:02x} {data[1]:02x}, "
            "expected 00 00"
        )
    type_code, ndim = data[2], data[3]
    if type_code != IDX_UBYTE:
        kind = IDX_TYPE_NAMES.get(type_code, "unknown type")
        raise DataError(
            f"{source}: unsupported IDX element type 0x{type_code:02x} ({kind}); "
            "only 0x08 (unsigned byte) is supported"
        )
    if ndim == 0:
        raise DataError(f"{source}: bad IDX header: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{source}: truncated: IDX header needs {header} bytes, found {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=object))
    found = len(data) - header
    if found < expected:
        raise DataError(
            f"{source}: truncated: expected {expected} bytes of data, found {found}"
        )
    if found > expected:
        raise DataError(
            f"{source}: {found - expected} unexpected trailing bytes after "
            f"{expected} bytes of data"
        )
    array = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header)
    try:
        return array.reshape(dims).copy()
    except ValueError as exc:  # more dimensions than numpy allows, or an empty array too big to describe
        raise DataError(f"{source}: bad IDX header: no array can have the {ndim} dimensions declared ({exc})") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected by its magic bytes).

    Returns a writable ``uint8`` array shaped as the header declares. Raises
    :class:`DataError` for unreadable files, corrupt gzip streams, a bad magic
    number, an element type other than unsigned byte, and a data length that
    differs from the header's in either direction.
    """
    return parse_idx(read_bytes(path), path)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str | None, source: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` unless ``data`` hashes to ``expected`` (None: no check)."""
    if expected is None:
        return
    actual = sha256_hex(data)
    if actual != expected:
        raise DataError(
            f"{source}: checksum mismatch: expected SHA-256 {expected[:16]}..., "
            f"got {actual[:16]}... (the file is corrupt or a different version)"
        )


# --------------------------------------------------------------------------
# Data set specs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class IdxDataset:
    """Everything needed to find, fetch and check one IDX-format data set.

    ``files`` maps a split name to its (images, labels) file names without
    ``.gz``; ``sha256`` maps each file name to the SHA-256 of its
    *decompressed* bytes (None: not verified); ``mirrors`` are base URLs that
    serve ``<file name>.gz``.
    """

    name: str
    files: Mapping[str, tuple[str, str]]
    sha256: Mapping[str, str | None]
    counts: Mapping[str, int]
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    debian_package: str | None = None
    debian_dir: Path | None = None

    @property
    def filenames(self) -> tuple[str, ...]:
        """All file names of all splits, images before labels."""
        return tuple(name for pair in self.files.values() for name in pair)


FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    files=types.MappingProxyType({
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }),
    sha256=types.MappingProxyType({
        "train-images-idx3-ubyte":
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte":
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte":
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte":
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }),
    counts=types.MappingProxyType({"train": 60000, "test": 10000}),
    image_shape=(1, 28, 28),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    debian_package="dataset-fashion-mnist",
    debian_dir=Path("/usr/share/datasets/fashion-mnist"),
)

MNIST = IdxDataset(
    name="mnist",
    files=FASHION_MNIST.files,
    sha256=types.MappingProxyType({
        "train-images-idx3-ubyte":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }),
    counts=FASHION_MNIST.counts,
    image_shape=(1, 28, 28),
    classes=tuple(str(digit) for digit in range(10)),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "http://yann.lecun.com/exdb/mnist/"),
)

DATASETS: Mapping[str, IdxDataset] = types.MappingProxyType(
    {spec.name: spec for spec in (FASHION_MNIST, MNIST)}
)


def get_dataset(dataset: str | IdxDataset) -> IdxDataset:
    """Return the spec for a registered name, or ``dataset`` itself if it is a spec."""
    if isinstance(dataset, IdxDataset):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown data set {dataset!r}; known: {known}") from None


def split_files(spec: IdxDataset, split: str) -> tuple[str, str]:
    """The (images, labels) file names of ``split``; a :class:`DataError` if unknown."""
    try:
        return spec.files[split]
    except KeyError:
        known = ", ".join(spec.files)
        raise DataError(f"{spec.name} has no split {split!r}; known: {known}") from None


def class_names(dataset: str | IdxDataset) -> tuple[str, ...]:
    """The class names of a data set, indexed by label."""
    return get_dataset(dataset).classes


# --------------------------------------------------------------------------
# Finding and downloading files
# --------------------------------------------------------------------------

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
    """The directory the user chose: ``data_dir`` if given, else ``$NIN_DATA_DIR``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("NIN_DATA_DIR")
    return Path(env) if env else None


def search_dirs(
    dataset: str | IdxDataset, data_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Directories searched for data files, in order of preference."""
    spec = get_dataset(dataset)
    chosen = user_data_dir(data_dir)
    dirs = [chosen] if chosen is not None else []
    for candidate in [cache_dir(spec), *debian_dirs(spec)]:
        if candidate not in dirs:
            dirs.append(candidate)
    return dirs


def find_in(directory: Path, filename: str) -> Path | None:
    """``directory/filename`` or ``directory/filename.gz``, whichever is a file."""
    for candidate in (directory / filename, directory / (filename + ".gz")):
        if candidate.is_file():
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


def _check_idx_body(sha256: str | None) -> Callable[[bytes, str], None]:
    def check(body: bytes, url: str) -> None:
        data = decompress_if_gzip(body, url)
        check_sha256(data, sha256, url)
        parse_idx(data, url)

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

    Each file may be stored as ``name`` or ``name.gz``. Directories are
    searched in this order: ``data_dir`` (else ``$NIN_DATA_DIR``), the user
    cache dir, the Debian package's directory. Missing files are downloaded
    into the user's chosen directory if there is one, else into the cache.
    Returns a mapping from file name (without ``.gz``) to its path.
    """
    spec = get_dataset(dataset)
    wanted = [name for split in (splits or spec.files) for name in split_files(spec, split)]
    dirs = search_dirs(spec, data_dir)
    found: dict[str, Path] = {}
    for name in wanted:
        path = next((p for d in dirs if (p := find_in(d, name)) is not None), None)
        if path is not None:
            found[name] = path
    missing = [name for name in wanted if name not in found]
    if not missing:
        return found
    if not download:
        raise DataError(how_to_get(spec, missing, dirs) + " (downloading was disabled)")
    target = user_data_dir(data_dir) or cache_dir(spec)
    for name in missing:
        urls = [mirror.rstrip("/") + "/" + name + ".gz" for mirror in spec.mirrors]
        try:
            found[name] = download_file(
                urls, target / (name + ".gz"), spec.sha256.get(name), opener, timeout
            )
        except DownloadError as exc:
            raise DataError(f"{how_to_get(spec, missing, dirs)} ({exc})") from exc
    return found


# --------------------------------------------------------------------------
# Loading a split
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One loaded split: uint8 images [N, C, H, W], int64 labels [N], and provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    images_path: Path
    labels_path: Path


def load_array(path: Path, sha256: str | None, verify: bool) -> np.ndarray:
    """Read one IDX file, checking its decompressed SHA-256 when ``verify``."""
    data = read_bytes(path)
    if verify:
        check_sha256(data, sha256, path)
    return parse_idx(data, path)


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
    range are always checked.
    """
    spec = get_dataset(dataset)
    images_name, labels_name = split_files(spec, split)
    paths = find_files(spec, data_dir, download, splits=[split], opener=opener)
    images_path, labels_path = paths[images_name], paths[labels_name]
    images = load_array(images_path, spec.sha256.get(images_name), verify)
    labels = load_array(labels_path, spec.sha256.get(labels_name), verify)

    channels, height, width = spec.image_shape
    if images.ndim != 3 or images.shape[1:] != (height, width):
        raise DataError(
            f"{images_path}: images have shape {images.shape}, expected (N, {height}, {width})"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    expected = spec.counts.get(split)
    if expected is not None and len(images) != expected:
        raise DataError(
            f"{images_path}: {len(images)} images, expected {expected} for "
            f"{spec.name} {split}"
        )
    if labels.size and int(labels.max()) >= len(spec.classes):
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range for "
            f"{len(spec.classes)} classes"
        )
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
