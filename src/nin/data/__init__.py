"""Every data set ``nin`` trains on, behind one name: what a run's ``--dataset`` may be.

* ``fashion-mnist``, ``mnist``: IDX files (:mod:`nin.data`), 1x28x28, 10 classes;
* ``cifar10``, ``cifar100``: the official python archives (:mod:`nin.data.cifar`), 3x32x32;
* ``folder:PATH``: your own images, one sub-folder per class (:mod:`nin.data.folder`), decoded
  to the model's channels and input size; the test split is ``--test-dir`` (same
  class sub-folders) or a seeded, stratified ``--test-fraction`` of PATH.

:class:`DataConfig` holds a run's data settings; :func:`load_splits` turns it into
a train and a test :class:`~nin.data.Split` of uint8 images ``[N, C, H, W]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from nin.bounds import MAX_IMAGE_SIDE, bounded, check_ranges, setting
from nin.data import cifar, sources
from nin.data import idx as data
from nin.data.idx import DataError, Split
from nin.errors import did_you_mean

FOLDER_PREFIX = "folder:"


@dataclass
class DataConfig:
    dataset: str = setting("fashion-mnist", "fashion-mnist, mnist, cifar10, cifar100, or folder:PATH (one "
                                            "sub-folder per class)", flags=("--dataset", "--data"), path=True)
    data_dir: str | None = setting(None, "directory holding the data files, the only place looked (also "
                                         "NIN_DATA_DIR); it must exist", path=True)
    download: bool = setting(True, "never download; fail if the files are not found", flags=("--no-download",),
                             action="store_false")
    verify: bool = setting(True, "accept files whose checksum differs from the published one (shapes and labels "
                                 "are still checked)", flags=("--no-checksum",), action="store_false")
    subset: int | None = bounded(None, 1, 10**9, help="train on a seeded random subset of N images")
    test_subset: int | None = bounded(None, 1, 10**9, help="evaluate on a seeded random subset of N images")
    # None: the model's own input size
    resize: int | None = bounded(None, 1, MAX_IMAGE_SIDE, help="input resolution (default: the model's)")
    # False: 0-1 scale only
    normalize: bool = setting(True, "normalize by training mean/std")
    whiten: bool = setting(False, "the paper's global contrast normalization and ZCA whitening, fitted on the "
                                  "training set")
    crop_padding: int = bounded(0, 0, 64, help="random translation of up to N pixels")
    flip: bool = setting(True, "random horizontal flips")
    erase: float = bounded(0.0, 0, 1, help="random erasing: the share of training images with one random rectangle "
                                           "(2-40%% of the image) filled with a random value (default 0: off)")
    test_dir: str | None = setting(None, "folder data: a test folder with the same class sub-folders", path=True)
    test_fraction: float = bounded(0.2, 0, 1, lo_open=True, hi_open=True,
                                   help="folder data without --test-dir: seeded share of each class held out "
                                        "(default 0.2)")
    skip_bad_images: bool = setting(False, "folder data: leave out files that cannot be decoded (they are listed) "
                                           "instead of failing", action="store_true")
    # None: folder.MAX_PIXELS
    max_pixels: int | None = bounded(None, 1, 2**31, metavar="N",
                                     help="refuse images of more than N pixels before decoding them (default "
                                          "67,108,864: a 64-megapixel photo); raise it for larger images")
    # A fixed draw, the same for every seed, so the test set is never used to choose settings.
    holdout: int | None = bounded(None, 1, 10**9, help="evaluate on N training images held out (the same N for "
                                                       "every seed) instead of the test split: a validation set "
                                                       "for choosing settings")

    def validate(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class DatasetEntry:
    """A named data set: its spec (plain data: files, checksums, counts, shape, classes), how one split is
    loaded, and how its files are found and checked for ``nin datasets``."""

    spec: Any  # a nin.data.idx.IdxDataset or a nin.data.cifar.CifarDataset
    load: Callable[..., Split]  # load(spec, split, data_dir, download, verify)
    status: Callable[[Any, str | None], tuple[str, str]]  # (where found, checksum status)
    source: str  # where it is downloaded from

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes) if hasattr(self.spec, "classes") else self.spec.num_classes


def folder_path(dataset: str) -> Path | None:
    """PATH of ``folder:PATH``; None for a named data set."""
    if not dataset.startswith(FOLDER_PREFIX):
        return None
    path = dataset[len(FOLDER_PREFIX):]
    if not path:
        raise DataError("folder: needs a path, e.g. --dataset folder:images/train")
    return Path(path).expanduser()


def check_name(dataset: str) -> None:
    if folder_path(dataset) is None and dataset not in NAMES:
        raise DataError(f"unknown dataset {dataset!r}{did_you_mean(dataset, NAMES)} (available: {', '.join(NAMES)}, "
                        "or folder:PATH)")


def image_shape(dataset: str) -> tuple[int, int, int] | None:
    """(C, H, W) of a named data set's images; None for an image folder (it takes the model's)."""
    check_name(dataset)
    info = NAMES.get(dataset)
    return info.image_shape if info else None


def _load_named(d: DataConfig, split: str) -> Split:
    entry = NAMES[d.dataset]
    return entry.load(entry.spec, split, d.data_dir, d.download, d.verify)


def _as_split(f) -> Split:
    return Split(images=f.images, labels=f.labels, classes=f.classes, images_path=f.root, labels_path=f.root)


def load_splits(
    d: DataConfig, *, channels: int, size: tuple[int, int], seed: int, splits: tuple[str, ...] = ("train", "test")
) -> tuple[dict[str, Split], list[tuple[str, str]]]:
    """The requested splits of ``d.dataset``, and the image files that were skipped as undecodable.

    Image folders are decoded to ``channels`` and ``size``; named data sets keep their own
    shape (the caller checks it against the model).
    """
    root = folder_path(d.dataset)
    if root is None:
        check_name(d.dataset)
        return {s: _load_named(d, s) for s in splits}, []
    from nin.data.folder import load_image_folder, split_folder

    on_error: Literal["fail", "skip"] = "skip" if d.skip_bad_images else "fail"
    opts = dict(channels=channels, size=size, on_error=on_error, cache_dir=sources.cache_dir("folders"),
                max_pixels=d.max_pixels)
    train = load_image_folder(root, **opts)
    if d.test_dir:
        test = load_image_folder(Path(d.test_dir).expanduser(), classes=train.classes, **opts)
    elif not 0 < d.test_fraction < 1:
        raise DataError(f"--test-fraction must be between 0 and 1, got {d.test_fraction}")
    else:
        train, test = split_folder(train, d.test_fraction, seed)
    skipped = [(os.path.join(str(f.root), p), why) for f in (train, test) for p, why in f.skipped]
    both = {"train": _as_split(train), "test": _as_split(test)}
    return {s: both[s] for s in splits}, list(dict.fromkeys(skipped))


def _idx_status(spec: data.IdxDataset, data_dir: str | None) -> tuple[str, str]:
    try:
        found = sources.find_files(spec, data_dir, download=False)
    except data.NotFoundError:
        return "not found", "-"
    except DataError as e:  # something that is not a regular file where a data file would be
        return ", ".join(map(str, sources.search_dirs(spec, data_dir))), f"BAD: {e}"
    where = sorted({str(p.parent) for p in found.values()})
    try:
        for name, path in found.items():
            sources.check_file(spec, name, path)  # in a stream: memory is one chunk, whatever the file holds
    except DataError as e:
        return ", ".join(where), f"BAD: {e}"
    return ", ".join(where), "ok (SHA-256 of the decompressed files)"


def _cifar_status(spec: cifar.CifarDataset, data_dir: str | None) -> tuple[str, str]:
    try:
        path, _ = cifar.find_archive(spec, data_dir)
    except DataError as e:  # something that is not a regular file where the archive would be
        return str(sources.user_data_dir(data_dir) or cifar.cache_dir(spec.name)), f"BAD: {e}"
    if path is None:
        return "not found", "-"
    try:
        cifar.check_md5(path, spec)
    except DataError as e:
        return str(path), f"BAD: {e}"
    return str(path), "ok (MD5 of the archive)"


def _idx(spec: data.IdxDataset) -> DatasetEntry:
    return DatasetEntry(spec, sources.load, _idx_status, spec.mirrors[0])


def _cifar(spec: cifar.CifarDataset) -> DatasetEntry:
    return DatasetEntry(spec, cifar.load, _cifar_status, spec.mirrors[0] + spec.archive)


#: The registry of named data sets, what ``--dataset`` may name besides ``folder:PATH``. To add one: its spec
#: and reader in a module of this package, and one entry here.
NAMES: Mapping[str, DatasetEntry] = MappingProxyType(
    {e.name: e for e in (_idx(data.FASHION_MNIST), _idx(data.MNIST), _cifar(cifar.CIFAR10), _cifar(cifar.CIFAR100))})


def status(data_dir: str | None = None) -> list[dict[str, object]]:
    """For each named data set: shape, classes, where its files are (or 'not found') and their checksum status.

    With ``data_dir`` (or ``$NIN_DATA_DIR``) only that directory is looked in, and it must exist (else a
    :class:`DataError` naming it); without, the places training looks. Every file is checked in a stream
    (a bad or oversized file is a ``BAD: ...`` row), so memory stays bounded whatever the files hold.
    """
    sources.user_data_dir(data_dir)  # a named directory that does not exist is one error, not four rows
    rows = []
    for name, info in NAMES.items():
        where, check = info.status(info.spec, data_dir)
        rows.append({"name": name, "shape": "x".join(map(str, info.image_shape)), "classes": info.num_classes,
                     "found": where, "checksum": check, "source": info.source})
    return rows
