"""Fuzzing the file readers: whatever the bytes, a reader returns valid data or raises its documented error.

Readers covered: IDX files (``nin.data.idx``), CIFAR batch pickles, archives and the decoded cache
(``nin.data.cifar``), single images, image folders and their cache (``nin.data.folder``), and checkpoints
(``nin.training.checkpoint`` and ``nin.inference.trained.load_trained``). The documented error is
:class:`nin.data.DataError` for data files and :class:`nin.training.checkpoint.CheckpointError` for
checkpoints, with a one-line message naming the file; a single image may raise only what
:data:`nin.data.images.DECODE_ERRORS` lists, which the folder loader turns into a ``DataError`` or a skipped
file. A cache is never fatal: a corrupt one is ignored and written again. Any other exception is a bug. When a
read succeeds, its result must keep the reader's promises (dtype, shapes that agree with the header, labels in
range, weights equal to the file's).

Random bytes rarely get past a reader's first check, so every reader is also fed *edits of a valid file*. An
edit is plain data (a tuple), so a failing case prints readably and can be pinned with ``@example``: byte
edits (truncate, flip a bit, overwrite, insert, delete) anywhere or near either end, header fields set to edge
values, gzip around garbage, and edits inside the structure where the format has one (JSON values, safetensors
headers and tensor bytes, tar header fields with a correct checksum, the contents of CIFAR batches).

Hypothesis runs derandomized (the same examples on every run, as CI needs) with few examples per test, so the
whole file takes about half a minute; ``NIN_FUZZ_SCALE=N`` multiplies the examples for a long session, and
``--hypothesis-show-statistics`` shows how far the inputs got. Each ``@example`` marked "was ..." is a bug
that fuzzing found."""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_cifar_archive
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from nin.data import cifar, folder
from nin.data import images as decoding
from nin.data.idx import DataError, IdxDataset, parse_idx, read_idx
from nin.data.sources import load as load_idx_split
from nin.inference.trained import load_trained
from nin.models import create_model
from nin.training import checkpoint as ckpt
from nin.training.checkpoint import CheckpointError
from nin.training.config import RunConfig

# Derandomized: every run tries the same examples, so CI is reproducible and a failure reproduces locally.
# too_slow: an example writes files and often builds a model, which the health check counts against it.
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow])
SCALE = int(os.environ.get("NIN_FUZZ_SCALE", "1"))  # NIN_FUZZ_SCALE=50: a long fuzzing session, 50 times the examples


def fuzz(examples: int) -> settings:
    """The CI profile with ``examples`` examples (times ``NIN_FUZZ_SCALE``)."""
    return settings(FUZZ, max_examples=examples * SCALE)


pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning",  # a mutated header declaring a big image
    "ignore::UserWarning",  # Pillow's "corrupt EXIF data" and the like: warnings, not errors
)


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory) -> Iterator[None]:
    """A private cache directory, and a low decompression-bomb limit.

    A mutated header may declare up to Pillow's limit of 89M pixels, which Pillow allocates before it
    finds the data truncated; a lower limit turns those into ``DecompressionBombError``, one of
    ``DECODE_ERRORS``, so the same error path is tested without hundreds of megabytes per example.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("NIN_DATA_DIR", raising=False)
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 16)
        yield


def attempt(error: type[Exception], call: Callable[..., Any], *args: Any, names: object = None, **kwargs: Any) -> Any:
    """``call``'s result, or None when it raises ``error`` with a one-line message (naming ``names`` if given).

    Any other exception propagates and fails the test: that is the bug fuzzing looks for.
    """
    try:
        result = call(*args, **kwargs)
    except error as exc:
        message = str(exc)
        gist = re.sub(r"\d+", "#", message.replace(str(names), "") if names is not None else message)
        event(f"{call.__name__}: {' '.join(gist.split()[:4])}")  # what fuzzing reached: --hypothesis-show-statistics
        assert message and "\n" not in message, f"not a one-line message: {message!r}"
        if names is not None:
            assert str(names) in message, f"the message does not name {names}: {message!r}"
        return None
    event(f"{call.__name__}: read")
    return result


# ------------------------------------------------------------------ edits, as plain data

EDGE_U32 = (0, 1, 2, 3, 255, 256, 65535, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
# Near the start, near the end (negative: -2 is the last byte, -1 just past it), or anywhere (a big number);
# a position is taken modulo the length plus one.
positions = st.integers(-300, 300) | st.integers(0, 1 << 30)


def byte_edits(max_edits: int = 4, fields: tuple[tuple[int, str], ...] = ()) -> st.SearchStrategy:
    """Lists of byte edits; ``fields`` are (offset, struct format) of header fields to set to edge values."""
    ops = [
        st.tuples(st.just("cut"), positions),
        st.tuples(st.just("flip"), positions, st.integers(0, 7)),
        st.tuples(st.just("put"), positions, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("ins"), positions, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("del"), positions, st.integers(1, 64)),
    ]
    for offset, fmt in fields:
        bits = 8 * struct.calcsize(fmt)
        values = st.sampled_from([v for v in EDGE_U32 if v < 1 << bits]) | st.integers(0, (1 << bits) - 1)
        ops.append(st.tuples(st.just("put"), st.just(offset), values.map(lambda v, f=fmt: struct.pack(f, v))))
    return st.lists(st.one_of(ops), min_size=1, max_size=max_edits)


def apply_bytes(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, *arg in edits:
        at = pos % (len(out) + 1)
        if kind == "cut":
            del out[at:]
        elif kind == "flip":
            if at < len(out):
                out[at] ^= 1 << arg[0]
        elif kind == "put":
            out[at:at + len(arg[0])] = arg[0]
        elif kind == "ins":
            out[at:at] = arg[0]
        elif kind == "del":
            del out[at:at + arg[0]]
    return bytes(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from([0, -1, 10**12, "", "nin_cifar10", "nin_d2l", [], {}, [28, 28]]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def json_edits(focus: tuple[tuple[str, ...], ...] = ((),), max_edits: int = 3) -> st.SearchStrategy:
    """Lists of ("set", (focus, index), value) / ("drop", (focus, index)): the index picks one of the values under
    ``focus`` in the document (modulo their number)."""
    where = st.tuples(st.sampled_from(focus), st.integers(0, 1 << 16))
    return st.lists(
        st.tuples(st.just("set"), where, json_values) | st.tuples(st.just("drop"), where),
        min_size=1, max_size=max_edits,
    )


def _paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def apply_json(doc: Any, edits: list[tuple]) -> Any:
    """``doc`` after ``edits``, as a new document (the values are copied: Hypothesis may hand out one object twice,
    and a later edit must not change it)."""
    doc = copy.deepcopy(doc)
    for kind, (focus, index), *value in edits:
        value = copy.deepcopy(value)
        paths = [p for p in _paths(doc) if p[:len(focus)] == focus] or [()]
        path = paths[index % len(paths)]
        if not path:  # the whole document
            doc = value[0] if kind == "set" else {}
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if kind == "set":
            parent[path[-1]] = value[0]
        else:
            del parent[path[-1]]
    return doc


def safetensors_edits(max_edits: int = 3) -> st.SearchStrategy:
    """Edits of a safetensors file: its JSON header, a tensor's bytes, or the raw bytes (the length field too)."""
    return st.lists(
        st.tuples(st.just("header"), json_edits(max_edits=1).map(lambda e: e[0]))
        | st.tuples(st.just("tensor"), st.integers(0, 1 << 16), st.integers(0, 1 << 30),
                    st.binary(min_size=1, max_size=8))
        | byte_edits(1, fields=((0, "<Q"),)).map(lambda e: e[0]),
        min_size=1, max_size=max_edits,
    )


def apply_safetensors(data: bytes, edits: list[tuple]) -> bytes:
    for edit in edits:
        (size,) = struct.unpack_from("<Q", data) if len(data) >= 8 else (len(data),)
        try:
            header = json.loads(data[8:8 + size])
        except (ValueError, RecursionError):
            header = None
        if edit[0] == "header" and isinstance(header, dict):
            text = json.dumps(apply_json(header, [edit[1]])).encode()
            data = struct.pack("<Q", len(text)) + text + data[8 + size:]
        elif edit[0] == "tensor" and isinstance(header, dict):
            spans = sorted((k, v["data_offsets"]) for k, v in header.items() if isinstance(v, dict)
                           and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
                           and all(isinstance(o, int) for o in v["data_offsets"]))
            if spans:
                begin, end = spans[edit[1] % len(spans)][1]
                at = 8 + size + begin + (edit[2] % max(end - begin, 1))
                data = data[:at] + edit[3] + data[at + len(edit[3]):]
        elif edit[0] not in ("header", "tensor"):
            data = apply_bytes(data, [edit])
    return data


# ---------------------------------------------------------------------------- IDX files


def idx_file(dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def check_idx(array: np.ndarray, data: bytes) -> None:
    """``array`` is what the (decompressed) IDX bytes ``data`` declare."""
    ndim = data[3]
    header = 4 + 4 * ndim
    assert data[:3] == b"\0\0\x08"
    assert array.dtype == np.uint8 and array.flags.writeable
    assert array.shape == struct.unpack_from(f">{ndim}I", data, 4)
    assert array.tobytes() == data[header:]


valid_idx = st.lists(st.integers(0, 4), min_size=1, max_size=3).flatmap(
    lambda dims: st.binary(min_size=int(np.prod(dims)), max_size=int(np.prod(dims))).map(
        lambda payload: idx_file(tuple(dims), payload)))
IDX_FIELDS = ((0, "B"), (1, "B"), (2, "B"), (3, "B"), (4, ">I"), (8, ">I"), (12, ">I"))


@pytest.mark.slow
@fuzz(150)
@given(data=st.binary(max_size=64) | st.tuples(st.sampled_from([b"\0\0\x08", b"\0\0\x08\x01", b"\0\0\x08\x03"]),
                                               st.binary(max_size=40)).map(b"".join))
@example(data=idx_file((1,) * 100, b"\x07"))  # was ValueError: numpy allows at most 64 dimensions
@example(data=idx_file((0, 2**32 - 1, 2**32 - 1), b""))  # was ValueError: an empty array too big to describe
def test_parse_idx_takes_any_bytes(data):
    array = attempt(DataError, parse_idx, data, "fuzz.idx", names="fuzz.idx")
    if array is not None:
        check_idx(array, data)


@pytest.mark.slow
@fuzz(150)
@given(valid=valid_idx, edits=byte_edits(fields=IDX_FIELDS),
       wrap=st.sampled_from(["raw", "gzip", "edit-gzip", "gzip-garbage"]))
@example(valid=idx_file((1,) * 100, b"\x07"), edits=[("flip", -1, 0)], wrap="gzip")  # was ValueError, via gzip
def test_read_idx_takes_edited_files(valid, edits, wrap):
    if wrap == "raw":
        raw = apply_bytes(valid, edits)
    elif wrap == "gzip":
        raw = gzip.compress(apply_bytes(valid, edits), mtime=0)
    elif wrap == "edit-gzip":
        raw = apply_bytes(gzip.compress(valid, mtime=0), edits)
    else:
        raw = b"\x1f\x8b" + apply_bytes(valid, edits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz-idx1-ubyte"
        path.write_bytes(raw)
        array = attempt(DataError, read_idx, path, names=path)
    if array is not None:
        check_idx(array, gzip.decompress(raw) if raw.startswith(b"\x1f\x8b") else raw)


TINY_IDX = IdxDataset(
    name="fuzz-idx", files={"test": ("images-idx3-ubyte", "labels-idx1-ubyte")},
    sha256={"images-idx3-ubyte": None, "labels-idx1-ubyte": None}, counts={"test": 3},
    image_shape=(1, 4, 4), classes=("a", "b", "c"), mirrors=(),
)


@pytest.mark.slow
@fuzz(100)
@given(which=st.sampled_from(["images", "labels"]), edits=byte_edits(fields=IDX_FIELDS), gz=st.booleans())
@example(which="labels", edits=[("put", -2, b"\x03")], gz=False)  # a label one past the last class is refused
def test_load_checks_what_the_split_promises(which, edits, gz):
    valid = {"images": idx_file((3, 4, 4), bytes(range(48))), "labels": idx_file((3,), b"\0\1\2")}
    valid[which] = apply_bytes(valid[which], edits)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name in zip(("images", "labels"), TINY_IDX.files["test"]):
            target = Path(tmp) / (name + ".gz" if gz else name)
            target.write_bytes(gzip.compress(valid[kind], mtime=0) if gz else valid[kind])
        split = attempt(DataError, load_idx_split, TINY_IDX, "test", tmp, download=False, verify=False, names=tmp)
    if split is not None:
        assert split.images.dtype == torch.uint8 and split.images.shape == (3, 1, 4, 4)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (3,)
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 3


# ------------------------------------------------------------------------------- CIFAR


def batch_pickle(n: int, protocol: int, labels: Any = None, data: Any = None) -> bytes:
    rng = np.random.default_rng(n)
    return pickle.dumps({
        b"batch_label": b"fuzz",
        b"labels": [i % 10 for i in range(n)] if labels is None else labels,
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
    }, protocol=protocol)


PICKLES = [batch_pickle(1, 2), batch_pickle(2, 4), pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, 2)]


def check_batch(batch: Any) -> None:
    assert isinstance(batch, dict) and all(isinstance(k, str) for k in batch)


@fuzz(150)
@given(data=st.binary(max_size=80) | st.tuples(st.sampled_from([b"\x80\x02", b"\x80\x04", b"\x80\x05"]),
                                               st.binary(max_size=80)).map(b"".join))
@example(data=b"P")  # was a two-line message (pickle's own, about persistent ids)
def test_unpickle_batch_takes_any_bytes(data):
    batch = attempt(DataError, cifar.unpickle_batch, data, "fuzz:batch", names="fuzz:batch")
    if batch is not None:
        check_batch(batch)


@pytest.mark.slow
@fuzz(150)
@given(which=st.integers(0, len(PICKLES) - 1), edits=byte_edits(6))
def test_unpickle_batch_takes_edited_pickles(which, edits):
    batch = attempt(DataError, cifar.unpickle_batch, apply_bytes(PICKLES[which], edits), "fuzz:batch",
                    names="fuzz:batch")
    if batch is not None:
        check_batch(batch)


def tar_bytes(members: dict[str, bytes], folder_name: str = cifar.CIFAR10.folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def meta_pickle(names: Any) -> bytes:
    return pickle.dumps({b"label_names": names}, protocol=2)


CIFAR_MEMBERS = {"batches.meta": meta_pickle([b"c%d" % i for i in range(10)]), "test_batch": batch_pickle(3, 2)}
TAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "typeflag": (156, 1), "linkname": (157, 100),
              "magic": (257, 8), "prefix": (345, 155)}
tar_values = (
    st.binary(max_size=12)
    | st.integers(0, 8**11 - 1).map(lambda v: b"%011o\0" % v)  # any octal number
    | st.integers(0, 1 << 64).map(lambda v: b"\x80" + v.to_bytes(11, "big"))  # base-256 numbers
    | st.sampled_from([b"0", b"1", b"2", b"3", b"5", b"6", b"L", b"K", b"S", b"x", b"g", b"ustar\x0000",
                       b"../evil", b"/etc/evil", b"cifar-10-batches-py/test_batch", b"cifar-10-batches-py"])
)
tar_edits = st.lists(
    st.tuples(st.just("tar"), st.integers(0, 1), st.sampled_from(sorted(TAR_FIELDS)), tar_values),
    min_size=1, max_size=3,
)


def apply_tar(data: bytes, edits: list[tuple]) -> bytes:
    """Set header fields of the members (by index) and write each header's checksum again."""
    out = bytearray(data)
    starts = [0]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = [m.offset for m in tar.getmembers()]
    for _, member, field, value in edits:
        start = starts[member % len(starts)]
        offset, width = TAR_FIELDS[field]
        out[start + offset:start + offset + width] = value.ljust(width, b"\0")[:width]
        header = out[start:start + 512]
        header[148:156] = b" " * 8
        out[start + 148:start + 156] = b"%06o\0 " % sum(header)
    return bytes(out)


labels_values = st.lists(st.integers(-3, 12), max_size=4) | st.lists(st.integers(), max_size=3) | json_values
data_values = st.tuples(
    st.sampled_from([np.uint8, np.int8, np.uint16, np.float32]),
    st.sampled_from([(0, 3072), (1, 3072), (2, 3072), (3, 3072), (3,), (3, 3071), (3, 3, 32, 32)]),
).map(lambda t: np.ones(t[1], dtype=t[0]))
names_values = (st.lists(st.binary(max_size=4), min_size=9, max_size=11) | st.lists(st.text(max_size=3), min_size=10,
                max_size=10) | json_values)
batch_contents = st.tuples(labels_values | st.none(), data_values | json_values | st.none(), names_values | st.none())


archive_cases = st.one_of(
    st.tuples(st.just("garbage"), st.binary(max_size=80)),  # the whole file
    st.tuples(st.just("gzip-garbage"), st.binary(max_size=80)),  # after the gzip magic
    st.tuples(st.just("gzip-bytes"), byte_edits()),  # edits of the compressed archive
    st.tuples(st.just("tar-bytes"), byte_edits()),  # edits of the tar inside
    st.tuples(st.just("tar-header"), tar_edits),  # header fields of the members
    st.tuples(st.just("member"), st.tuples(st.sampled_from(sorted(CIFAR_MEMBERS)), byte_edits(6))),  # a pickle
    st.tuples(st.just("contents"), batch_contents),  # what the pickles hold
)


@pytest.mark.slow
@fuzz(150)
@given(case=archive_cases)
@example(case=("contents", (None, None, [b"\xff"] * 10)))  # was UnicodeDecodeError: a class name that is not UTF-8
@example(case=("tar-header", [("tar", 0, "size", b"\x80" + (2**64).to_bytes(11, "big"))]))  # was ValueError (seek)
def test_read_archive_takes_edited_archives(case):
    layer, edit = case
    members = dict(CIFAR_MEMBERS)
    if layer == "member":
        members[edit[0]] = apply_bytes(members[edit[0]], edit[1])
    elif layer == "contents":
        labels, data, names = edit
        members["test_batch"] = batch_pickle(3, 2, labels, data)
        if names is not None:
            members["batches.meta"] = meta_pickle(names)
    tar = tar_bytes(members)
    if layer == "tar-bytes":
        tar = apply_bytes(tar, edit)
    elif layer == "tar-header":
        tar = apply_tar(tar, edit)
    archive = gzip.compress(tar, mtime=0)
    if layer == "gzip-bytes":
        archive = apply_bytes(archive, edit)
    elif layer == "garbage":
        archive = edit
    elif layer == "gzip-garbage":
        archive = b"\x1f\x8b\x08" + edit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / cifar.CIFAR10.archive
        path.write_bytes(archive)
        split = attempt(DataError, cifar.read_archive, path, cifar.CIFAR10, "test", names=path)
    if split is not None:
        check_split(split, cifar.CIFAR10)


def check_split(split: Any, spec: cifar.CifarDataset) -> None:
    """uint8 images [N, 3, 32, 32], int64 labels [N] in range, one name per class."""
    n = len(split.labels)
    assert split.images.dtype == torch.uint8 and tuple(split.images.shape) == (n, *spec.image_shape)
    assert split.labels.dtype == torch.int64 and tuple(split.labels.shape) == (n,)
    assert n == 0 or 0 <= int(split.labels.min()) <= int(split.labels.max()) < spec.num_classes
    assert len(split.classes) == spec.num_classes and all(isinstance(c, str) for c in split.classes)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, isolated) -> Path:
    """A small CIFAR-10 archive, loaded once so that its decoded cache exists."""
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_archive(root / cifar.CIFAR10.archive, cifar.CIFAR10, {"train": 5, "test": 4})
    cifar.load("cifar10", "test", root, download=False, verify=False)
    return root


@pytest.mark.slow
@fuzz(60)
@given(edits=safetensors_edits())
@example(edits=[("tensor", 1, 0, b"\x7f")])  # was served from the cache: label 127
@example(edits=[("header", ("set", (("__metadata__", "classes"), 0), json.dumps([0] * 10)))])  # was served: classes 0
@example(edits=[("header", ("set", (("__metadata__", "classes"), 0), "[" * 5000))])  # was RecursionError
def test_a_corrupt_cifar_cache_is_ignored_and_rebuilt(cifar_dir, edits):
    archive = cifar_dir / cifar.CIFAR10.archive
    file = cifar._cache_path(cifar.CIFAR10, archive, "test", False)
    good = file.read_bytes()
    file.write_bytes(apply_safetensors(good, edits))
    try:
        split = cifar.load("cifar10", "test", cifar_dir, download=False, verify=False)
        check_split(split, cifar.CIFAR10)
        assert len(split.labels) == 4
        assert cifar._read_cache(file, archive, cifar.CIFAR10) is not None  # read, or written again
    finally:
        file.write_bytes(good)


# ------------------------------------------------------------------------------ images


def _image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    images = {
        "rgb.png": (rgb, "PNG", {}), "rgba.png": (rgb.convert("RGBA"), "PNG", {}),
        "p.png": (rgb.convert("P"), "PNG", {}),
        "i16.png": (Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16)), "PNG", {}),
        "l.jpg": (rgb.convert("L"), "JPEG", {}), "exif.jpg": (rgb, "JPEG", {"exif": exif}),
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {}), "rgb.bmp": (rgb, "BMP", {}),
        "p.gif": (rgb.convert("P"), "GIF", {}),
        "f.tif": (Image.fromarray(rng.random((5, 7), dtype=np.float32)), "TIFF", {}),
        "rgb.tif": (rgb, "TIFF", {}), "rgb.webp": (rgb, "WEBP", {"lossless": True}),
    }
    seeds = {}
    for name, (img, fmt, options) in images.items():
        buf = io.BytesIO()
        img.save(buf, fmt, **options)
        seeds[name] = buf.getvalue()
    return seeds


IMAGES = _image_seeds()
IMAGE_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"GIF89a", b"II*\0", b"MM\0*", b"RIFF\0\0\0\0WEBPVP8 "]
decode_options = st.tuples(st.sampled_from([1, 3]), st.tuples(st.integers(1, 9), st.integers(1, 9)),
                           st.sampled_from(["crop", "stretch"]))


def decode(path: Path, options: tuple) -> None:
    """decode_image raises only DECODE_ERRORS, and returns uint8 [channels, H, W]."""
    channels, size, fit = options
    try:
        array = decoding.decode_image(path, channels, size, fit)
    except decoding.DECODE_ERRORS as exc:
        event(f"decode_image: {type(exc).__name__}")
        return
    event("decode_image: read")
    assert array.dtype == np.uint8 and array.shape == (channels, *size)


@fuzz(150)
@given(data=st.binary(max_size=64) | st.tuples(st.sampled_from(IMAGE_MAGIC), st.binary(max_size=64)).map(b"".join),
       options=decode_options)
def test_decode_image_takes_any_bytes(data, options):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.png"
        path.write_bytes(data)
        decode(path, options)


@pytest.mark.slow
@fuzz(200)
@given(name=st.sampled_from(sorted(IMAGES)), edits=byte_edits(fields=((18, "<I"), (22, "<I"), (6, "<H"), (8, "<H"))),
       options=decode_options)
def test_decode_image_takes_edited_images(name, edits, options):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(apply_bytes(IMAGES[name], edits))
        decode(path, options)


@fuzz(60)
@given(name=st.sampled_from(sorted(IMAGES)), edits=byte_edits(), on_error=st.sampled_from(["fail", "skip"]))
def test_load_image_folder_with_one_edited_image(name, edits, on_error):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel in ("a/good.png", "b/good.png"):
            (root / rel).parent.mkdir(exist_ok=True)
            (root / rel).write_bytes(IMAGES["rgb.png"])
        (root / "b" / f"fuzz{Path(name).suffix}").write_bytes(apply_bytes(IMAGES[name], edits))
        split = attempt(DataError, folder.load_image_folder, root, channels=1, size=(4, 4), on_error=on_error,
                        workers=1, names=root)
    if on_error == "skip":
        assert split is not None, "with on_error='skip' a bad image is left out, never an error"
    if split is not None:
        n = len(split.files)
        assert split.images.dtype == torch.uint8 and tuple(split.images.shape) == (n, 1, 4, 4)
        assert split.labels.tolist() == [0] + [1] * (n - 1) and split.classes == ("a", "b")
        found = sorted([*split.files, *(rel for rel, _ in split.skipped)])
        assert found == ["a/good.png", f"b/fuzz{Path(name).suffix}", "b/good.png"]
        assert on_error == "skip" or not split.skipped


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, Path, folder.FolderSplit]:
    """A small image folder (one image undecodable) and its cache directory, loaded once."""
    root, cache = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("image-cache")
    for rel, blob in [("a/1.png", IMAGES["rgb.png"]), ("a/2.jpg", IMAGES["l.jpg"]), ("b/3.gif", IMAGES["p.gif"]),
                      ("b/bad.png", b"not an image")]:
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(blob)
    split = folder.load_image_folder(root, channels=3, size=(5, 5), on_error="skip", cache_dir=cache, workers=1)
    return root, cache, split


@pytest.mark.slow
@fuzz(60)
@given(edits=safetensors_edits())
def test_a_corrupt_folder_cache_is_ignored_and_rebuilt(image_folder, edits):
    root, cache, first = image_folder
    (file,) = cache.glob("*.safetensors")
    good = file.read_bytes()
    file.write_bytes(apply_safetensors(good, edits))
    try:
        split = folder.load_image_folder(root, channels=3, size=(5, 5), on_error="skip", cache_dir=cache, workers=1)
        # The cache has no checksum: image bytes and the skipped files' reasons (text) may differ from the first load.
        assert (split.classes, split.files) == (first.classes, first.files)
        assert [rel for rel, _ in split.skipped] == [rel for rel, _ in first.skipped]
        assert all(isinstance(reason, str) for _, reason in split.skipped)
        assert torch.equal(split.labels, first.labels)
        assert split.images.dtype == torch.uint8 and split.images.shape == first.images.shape
        assert [p.name for p in cache.glob("*.safetensors")] == [file.name]
        again = folder.load_image_folder(root, channels=3, size=(5, 5), on_error="skip", cache_dir=cache, workers=1)
        assert torch.equal(again.images, split.images)  # the cache now holds what was returned
    finally:
        file.write_bytes(good)


# ------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread) -> Path:
    """A valid checkpoint of a nin28 with a trainer state shaped like a training run's (SGD momentum buffers under
    integer keys, an RNG state, a history)."""
    torch.manual_seed(0)
    model = create_model("nin28")
    params = list(model.parameters())
    optimizer = {"state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": list(range(len(params)))}]}
    meta = {
        "model": {"name": "nin28", "options": {"in_channels": 1, "num_classes": 10}},
        "data": {"dataset": "fashion-mnist", "size": [28, 28], "mean": [0.286], "std": [0.353],
                 "classes": [f"class{i}" for i in range(10)], "whitening": None},
        "config": RunConfig().to_dict(),
    }
    state = {"optimizer": optimizer, "rng": {"cpu": torch.get_rng_state()},
             "history": [{"epoch": 1, "train_loss": 0.5}]}
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "step-1", model, state, meta)


@contextlib.contextmanager
def variant(checkpoint: Path, name: str, data: bytes) -> Iterator[Path]:
    """A copy of ``checkpoint`` whose file ``name`` holds ``data`` (the others are hard links).

    An edited tensor file gets its checksum in meta.json rewritten to match, so the edit reaches the
    safetensors parser and the loaders instead of stopping at the checksum (tests/test_checkpoint.py
    proves the checksum catches edits).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoints" / "step-1"
        path.mkdir(parents=True)
        for file in ckpt.FILES:
            if file != name and not (file == "meta.json" and name in ckpt.TENSOR_FILES):
                os.link(checkpoint / file, path / file)
        (path / name).write_bytes(data)
        if name in ckpt.TENSOR_FILES:
            meta = json.loads((checkpoint / "meta.json").read_text())
            meta["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
            (path / "meta.json").write_text(json.dumps(meta))
        yield path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def check_model(model: torch.nn.Module, path: Path) -> None:
    """``model`` holds exactly the weights in ``path``'s model.safetensors."""
    weights, state = load_file(path / "model.safetensors"), model.state_dict()
    assert state.keys() == weights.keys()
    assert all(same_bits(state[k], weights[k]) for k in state)


def read_everything(path: Path, weights: bool = False) -> None:
    """Every checkpoint reader on ``path``: a valid result or a one-line CheckpointError naming the checkpoint.

    ``weights``: also load model.safetensors into a nin28 directly (load_trained stops before that when the file
    is too small for the model meta.json declares).
    """
    meta = attempt(CheckpointError, ckpt.read_meta, path, names=path)
    if meta is not None:
        assert isinstance(meta, dict) and meta["format"] == ckpt.FORMAT and meta["version"] == ckpt.VERSION
        state = attempt(CheckpointError, ckpt.load_state, path, meta, names=path)
        assert state is None or isinstance(state, dict)
    if weights:
        model = create_model("nin28")
        if attempt(CheckpointError, ckpt.load_weights, path, model, names=path) is not None:
            check_model(model, path)
    trained = attempt(CheckpointError, load_trained, path, "cpu", names=path)  # load_weights included
    if trained is not None:
        assert not trained.model.training
        check_model(trained.model, path)


@fuzz(60)
@given(data=st.binary(max_size=64) | st.text(max_size=40).map(str.encode) | json_values.map(
    lambda v: json.dumps(v).encode()))
@example(data=b"[" * 5000)  # was RecursionError from the JSON parser
def test_any_meta_json(checkpoint, data):
    with variant(checkpoint, "meta.json", data) as path:
        read_everything(path)


def json_case(*edits: tuple) -> tuple:
    return ("json", list(edits))


SHARED = [28, 28]  # as sampled_from hands out one object again and again


@pytest.mark.slow
@fuzz(90)
@given(case=st.tuples(st.just("json"), json_edits(focus=((), ("model",), ("data",), ("state",), ("config",))))
       | st.tuples(st.just("bytes"), byte_edits(2)))
@example(case=json_case(("set", (("model", "options"), 0), "ab")))  # was ValueError from dict()
@example(case=json_case(("set", (("model", "options"), 0), {"foo": 1})))  # was NinError, naming no file
@example(case=json_case(("set", (("model", "options"), 0), {"a\nb": 1})))  # then a two-line message
@example(case=json_case(("set", (("model", "name"), 0), 5)))  # was TypeError
@example(case=json_case(("set", (("data", "whitening"), 0), 5)))  # was TypeError
@example(case=json_case(("set", (("data", "whitening"), 0), "missing.safetensors")))  # was NinError
@example(case=json_case(("set", (("model", "options", "num_classes"), 0), 10**12)))  # was a 384 TB allocation
@example(case=json_case(("set", (("state",), 0), {"__tensor__": [1]})))  # was TypeError
@example(case=json_case(("set", (("state",), 0), {"__dict__": [[1]]})))  # was ValueError
@example(case=json_case(("set", (("state",), 0), 5)))  # was returned as the trainer state
@example(case=json_case(("set", ((), 0), SHARED), ("set", ((), 1), SHARED)))  # one object twice makes no cycle
def test_edited_meta_json(checkpoint, case):
    kind, edits = case
    if kind == "json":
        data = json.dumps(apply_json(json.loads((checkpoint / "meta.json").read_text()), edits)).encode()
    else:
        data = apply_bytes((checkpoint / "meta.json").read_bytes(), edits)
    with variant(checkpoint, "meta.json", data) as path:
        read_everything(path)


def test_deeply_nested_state_is_a_checkpoint_error(checkpoint):
    """Nesting that JSON parses but rebuilding the state cannot recurse through (was RecursionError).

    The depth follows the recursion limit, which other tests' libraries may have raised.
    """
    state: Any = 0
    for _ in range(sys.getrecursionlimit() * 3 // 4):
        state = {"k": state}
    doc = {**json.loads((checkpoint / "meta.json").read_text()), "state": state}
    with variant(checkpoint, "meta.json", json.dumps(doc).encode()) as path:
        with pytest.raises(CheckpointError, match="step-1"):
            ckpt.load_state(path)


@pytest.mark.slow
@fuzz(50)
@given(name=st.sampled_from(["model.safetensors", "state.safetensors"]),
       data=st.binary(max_size=64) | st.tuples(st.integers(0, 300).map(lambda n: struct.pack("<Q", n)),
                                               st.binary(max_size=64)).map(b"".join))
def test_any_safetensors_bytes(checkpoint, name, data):
    with variant(checkpoint, name, data) as path:
        read_everything(path, weights=name == "model.safetensors")


@pytest.mark.slow
@fuzz(80)
@given(name=st.sampled_from(["model.safetensors", "state.safetensors"]), edits=safetensors_edits())
@example(name="model.safetensors", edits=[("header", ("set", ((), 0), {"": ["\n"]}))])  # was a two-line message
def test_edited_safetensors(checkpoint, name, edits):
    with variant(checkpoint, name, apply_safetensors((checkpoint / name).read_bytes(), edits)) as path:
        read_everything(path, weights=name == "model.safetensors")


def test_the_edits_reach_past_the_first_check(checkpoint):
    """The structured edits are worth their time: some edited files still read, others fail deep inside."""
    doc = json.loads((checkpoint / "meta.json").read_text())
    assert apply_json(doc, [("set", (("model", "name"), 0), "x")])["model"]["name"] == "x"
    weights = (checkpoint / "model.safetensors").read_bytes()
    edited = apply_safetensors(weights, [("tensor", 0, 0, b"\0\0\0\0")])
    assert len(edited) == len(weights) and edited != weights
    with variant(checkpoint, "model.safetensors", edited) as path:
        check_model(load_trained(path, "cpu").model, path)
    tar = apply_tar(tar_bytes(CIFAR_MEMBERS), [("tar", 1, "typeflag", b"2")])
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert archive.getmembers()[1].issym()  # the checksum was written again: tarfile reads the header

