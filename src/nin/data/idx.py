"""Image classification data sets stored as IDX files (Fashion-MNIST, MNIST).

Reading top to bottom:

1. :func:`read_idx` turns one IDX file (raw or gzip) into a numpy array and
   rejects anything that is not exactly a well-formed IDX file. It reads in a
   stream (:class:`IdxStream`): the header first, then at most the data it
   declares, so memory is bounded by what the caller allows (a data set's
   counts, or :data:`MAX_IDX_BYTES`), never by what a file holds or claims.
2. :class:`IdxDataset` describes a data set as plain data; :data:`DATASETS`
   holds the known ones.
3. :class:`Split` holds one loaded split.

Finding the files, downloading them and loading a split are :mod:`nin.data.sources`.

Every problem with the data is reported as a :class:`DataError`, whose message
names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import types
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from nin.errors import NinError
from nin.files import open_regular, os_reason


class DataError(NinError):
    """A data file is missing, unreadable, corrupt or not what was expected."""


class DownloadError(DataError):
    """No mirror could be reached; the data may still be obtained another way."""


class NotFoundError(DataError):
    """A data set's files are in none of the directories looked in (and were not to be downloaded)."""


# --------------------------------------------------------------------------
# Reading IDX files
# --------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE = 0x08
IDX_TYPE_NAMES = types.MappingProxyType(
    {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16",
     0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
)
# The most data an IDX file outside a known data set may declare: ten times the largest file of a known one
# (Fashion-MNIST's training images, 47 MB). A header declaring more is refused before any data is read.
MAX_IDX_BYTES = 512 * 1024 * 1024
# Bytes past the declared data are counted up to this many (and reported as "more than" beyond), so a gzip
# bomb that decompresses without end is never read to its end.
TRAILING_BYTES_COUNTED = 1024 * 1024
READ_CHUNK = 1024 * 1024  # decompressed bytes asked for at once: memory is one chunk plus the array itself


class IdxStream:
    """The decompressed bytes of one IDX file, raw or gzip (told by its magic bytes), read in bounded pieces.

    Every byte read is added to :attr:`sha256`. A read error or corrupt gzip data is a :class:`DataError`
    naming ``source``. :meth:`open` opens a file (regular files only); the constructor takes any binary
    file object that can seek (a downloaded body in a ``BytesIO``).
    """

    def __init__(self, raw: BinaryIO, source: str | os.PathLike[str]):
        self.source = source
        self.sha256 = hashlib.sha256()
        self._raw = raw
        gz = self._call(raw.read, len(GZIP_MAGIC)) == GZIP_MAGIC
        raw.seek(0)
        self._file: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | os.PathLike[str]) -> Iterator[IdxStream]:
        """``path`` as an :class:`IdxStream`; a missing or non-regular file is a :class:`DataError`."""
        with open_data_file(path) as raw:
            yield cls(raw, path)

    def _call(self, read: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return read(arg)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # BadGzipFile before the OSError it is
            raise DataError(f"{self.source}: corrupt gzip data: {exc or type(exc).__name__}") from None
        except OSError as exc:
            raise DataError(f"{self.source}: cannot read: {os_reason(exc)}") from None

    def readinto(self, view: memoryview) -> int:
        """Fill ``view``; returns the bytes read, fewer than its length only at the end of the data."""
        done = 0
        while done < len(view):
            got = self._call(self._file.readinto, view[done:done + READ_CHUNK])
            if not got:
                break
            self.sha256.update(view[done:done + got])
            done += got
        return done

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end); for headers, ``n`` is small."""
        buf = bytearray(n)
        return bytes(buf[:self.readinto(memoryview(buf))])

    def skip(self, n: int) -> int:
        """Read and discard up to ``n`` bytes in chunks (still hashed); returns how many there were."""
        scratch = memoryview(bytearray(min(n, READ_CHUNK)))
        done = 0
        while done < n:
            got = self.readinto(scratch[:min(n - done, len(scratch))])
            if not got:
                break
            done += got
        return done


def open_data_file(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; otherwise ``PATH: cannot read: WHY`` (:class:`DataError`).

    Opened with :func:`nin.files.open_regular`: a FIFO, a device or a directory is refused without blocking.
    """
    try:
        return open_regular(path, error=DataError)
    except DataError as exc:
        raise DataError(f"{path}: cannot read: {str(exc).removeprefix(f'{path}: ')}") from None


def _parse_header(read: Callable[[int], bytes], source: str | os.PathLike[str]) -> tuple[int, ...]:
    """The dimensions of the IDX header that ``read(n)`` yields; anything but unsigned bytes is a DataError."""
    start = read(4)
    if len(start) < 4:
        raise DataError(f"{source}: not an IDX file: only {len(start)} bytes long")
    if start[0] != 0 or start[1] != 0:
        raise DataError(
            f"{source}: not an IDX file: magic starts with {start[0]:02x} {start[1]:02x}, "
            "expected 00 00"
        )
    type_code, ndim = start[2], start[3]
    if type_code != IDX_UBYTE:
        kind = IDX_TYPE_NAMES.get(type_code, "unknown type")
        raise DataError(
            f"{source}: unsupported IDX element type 0x{type_code:02x} ({kind}); "
            "only 0x08 (unsigned byte) is supported"
        )
    if ndim == 0:
        raise DataError(f"{source}: bad IDX header: zero dimensions")
    dims = read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(
            f"{source}: truncated: IDX header needs {4 + 4 * ndim} bytes, found {4 + len(dims)}"
        )
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


def read_header(stream: IdxStream) -> tuple[int, ...]:
    """The dimensions declared by the IDX header at the start of ``stream`` (nothing past it is read)."""
    return _parse_header(stream.read, stream.source)


def _shaped(array: np.ndarray, dims: tuple[int, ...], source: str | os.PathLike[str]) -> np.ndarray:
    try:
        return array.reshape(dims)
    except ValueError as exc:  # more dimensions than numpy allows, or an empty array too big to describe
        raise DataError(f"{source}: bad IDX header: no array can have the {len(dims)} dimensions declared "
                        f"({exc})") from None


def _data_bytes(dims: tuple[int, ...], source: str | os.PathLike[str], limit: int) -> int:
    """The data bytes ``dims`` declare; more than ``limit`` is a :class:`DataError`, before any is read."""
    expected = math.prod(dims)
    if expected > limit:
        shape = " x ".join(map(str, dims))
        raise DataError(f"{source}: bad IDX header: dimensions {shape} declare {expected:,} bytes of data, "
                        f"more than the {limit:,} bytes allowed")
    return expected


def _finish(stream: IdxStream, expected: int, found: int, sha256: str | None) -> None:
    """After the data: short data, bytes past it and (``sha256`` not None) the checksum are DataErrors."""
    if found < expected:
        raise DataError(f"{stream.source}: truncated: expected {expected} bytes of data, found {found}")
    extra = stream.skip(TRAILING_BYTES_COUNTED + 1)  # also reaches the end of a gzip stream, checking its CRC
    if extra > TRAILING_BYTES_COUNTED:
        raise DataError(f"{stream.source}: more than {TRAILING_BYTES_COUNTED} unexpected trailing bytes after "
                        f"{expected} bytes of data")
    if extra:
        raise DataError(f"{stream.source}: {extra} unexpected trailing bytes after {expected} bytes of data")
    check_digest(stream.sha256.hexdigest(), sha256, stream.source)


def read_data(stream: IdxStream, dims: tuple[int, ...], *, limit: int = MAX_IDX_BYTES,
              sha256: str | None = None) -> np.ndarray:
    """The data after the header as a writable uint8 array of shape ``dims``.

    At most ``limit`` bytes of data may be declared; the data must be exactly as long as declared, and
    the SHA-256 of the whole decompressed file must be ``sha256`` (None: not checked).
    """
    expected = _data_bytes(dims, stream.source, limit)
    array = np.empty(expected, dtype=np.uint8)  # pages are only committed as the data fills them
    _finish(stream, expected, stream.readinto(memoryview(array)), sha256)
    return _shaped(array, dims, stream.source)


def check_data(stream: IdxStream, dims: tuple[int, ...], *, limit: int = MAX_IDX_BYTES,
               sha256: str | None = None) -> None:
    """The length and checksum checks of :func:`read_data`, without keeping the data: memory is one chunk."""
    expected = _data_bytes(dims, stream.source, limit)
    _finish(stream, expected, stream.skip(expected), sha256)


def parse_idx(data: bytes, source: str | os.PathLike[str]) -> np.ndarray:
    """Parse decompressed IDX bytes already in memory into a writable uint8 array of the declared shape.

    ``source`` only names the data in error messages.
    """
    buf = io.BytesIO(data)
    dims = _parse_header(buf.read, source)
    header = buf.tell()
    expected = math.prod(dims)
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
    return _shaped(array, dims, source).copy()


def read_idx(path: str | os.PathLike[str], limit: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected by its magic bytes), in a stream.

    Returns a writable ``uint8`` array shaped as the header declares. Raises
    :class:`DataError` for unreadable or non-regular files, corrupt gzip streams, a bad magic
    number, an element type other than unsigned byte, a header declaring more than ``limit`` bytes
    of data, and a data length that differs from the header's in either direction. Memory is the
    array plus one chunk, whatever the file holds: a gzip bomb is never decompressed past the
    declared length (and :data:`TRAILING_BYTES_COUNTED` more).
    """
    with IdxStream.open(path) as stream:
        return read_data(stream, read_header(stream), limit=limit)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_digest(actual: str, expected: str | None, source: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` unless the SHA-256 hex digest ``actual`` is ``expected`` (None: no check)."""
    if expected is not None and actual != expected:
        raise DataError(
            f"{source}: checksum mismatch: expected SHA-256 {expected[:16]}..., "
            f"got {actual[:16]}... (the file is corrupt or a different version)"
        )


def check_sha256(data: bytes, expected: str | None, source: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` unless ``data`` hashes to ``expected`` (None: no check)."""
    if expected is not None:
        check_digest(sha256_hex(data), expected, source)


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
