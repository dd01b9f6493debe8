"""Hostile data files and names: each is one DataError line naming the file, never a hang or unbounded memory.

Two classes of bad input, built cheaply in ``tmp_path``:

* **Memory bounded by what the caller expects, not by what a file claims.** Gzip bombs posing as IDX
  files (``read_idx``, a split of Fashion-MNIST, ``nin datasets``, a download), IDX headers declaring
  more data than allowed, CIFAR archives with an oversized member or too many members, and images whose
  header declares more pixels than the cap (refused before a pixel is decoded; a raised cap accepts
  them, without Pillow's own bomb warning). Peak memory is measured with :mod:`tracemalloc` (numpy and
  zlib allocations are traced), and the decompressed bytes the reader asks for are counted.
* **A name the user gives is used, or fails naming it.** FIFOs (which block a plain ``open`` forever:
  these tests run under an alarm), links to ``/dev/zero``, loops of symbolic links, a ``--data-dir`` /
  ``NIN_DATA_DIR`` that is missing or a file (data found elsewhere is never used instead), a data file
  that is a directory, and image folders that are missing or hold such entries.

``nin datasets`` over a bomb is an honest ``BAD: ...`` row (exit 0): the command reports every data set's
state, and one bad file must not hide the others. A named directory that does not exist is exit 2, one line.

A Hypothesis test varies the IDX header fields (element type, number of dimensions, dimensions) against
the streaming reader: it returns the array the header declares, or a one-line DataError.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from conftest import make_cifar_archive, within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from nin.cli.main import main
from nin.data import DataConfig, cifar, folder, load_splits, sources
from nin.data import idx as data
from nin.data import images as decoding
from nin.data.idx import DataError
from nin.inference import predict

MiB = 1024 * 1024
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
TRAIN_IMAGES_BYTES = 60000 * 28 * 28


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No NIN_DATA_DIR, and an empty cache of our own."""
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def real_files(fashion_mnist) -> dict[str, Path]:
    """The real Fashion-MNIST files (the Debian package's), by name."""
    return sources.find_files("fashion-mnist", download=False)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def peak_memory():
    """Yields a dict whose "peak" is, after the block, the most bytes allocated at once inside it."""
    result = {}
    tracemalloc.start()
    try:
        yield result
    finally:
        result["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@contextlib.contextmanager
def counted_reads():
    """Counts the decompressed bytes every IdxStream reads ("total"), and the largest single request."""
    seen = {"total": 0, "largest": 0}
    real = data.IdxStream.readinto

    def readinto(self, view):
        seen["largest"] = max(seen["largest"], len(view))
        got = real(self, view)
        seen["total"] += got
        return got

    with mock.patch.object(data.IdxStream, "readinto", readinto):
        yield seen


def idx_header(dims: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_bomb(path: Path, head: bytes, mib: int) -> Path:
    """A single gzip stream: ``head``, then ``mib`` MiB of zeros, written in a few KB.

    Each MiB of zeros is deflated once after a full flush, which makes every later block the same
    bytes; the block is repeated ``mib`` times. The stream has no end (no trailer): a reader that
    stops where the header says the data ends never notices; one that decompresses it all fails late.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    zeros = bytes(MiB)
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    path.write_bytes(first + block * mib)
    return path


def png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of zeros: a few KB even for 12,000 x 12,000 pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def link(path: Path, target: str | Path) -> Path:
    path.symlink_to(target)
    return path


def loop(path: Path) -> Path:
    """A symbolic link to itself: opening it is ELOOP."""
    return link(path, path.name)


def one_line(message: str, *needles: object) -> None:
    assert message and "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"


def fashion_dir(directory: Path, real_files: dict[str, Path], **replace: Path) -> Path:
    """``directory`` holding links to the real Fashion-MNIST files, except those named in ``replace``."""
    directory.mkdir(exist_ok=True)
    for name in FASHION_FILES:
        if name not in replace:
            link(directory / real_files[name].name, real_files[name])
    return directory


# ---------------------------------------------------------------- gzip bombs and oversized IDX headers


def test_a_gzip_bomb_is_decompressed_only_as_far_as_its_header_declares(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb-idx3-ubyte.gz", idx_header((1000, 28, 28)), mib=256)
    assert bomb.stat().st_size < 300 * 1024  # 256 MiB of zeros in a file of a quarter MiB
    start = time.monotonic()
    with peak_memory() as mem, counted_reads() as reads, pytest.raises(DataError) as err:
        data.read_idx(bomb)
    one_line(str(err.value), bomb, "more than 1048576 unexpected trailing bytes after 784000 bytes of data")
    assert reads["total"] <= 16 + 784000 + data.TRAILING_BYTES_COUNTED + 1
    assert reads["largest"] <= data.READ_CHUNK
    assert mem["peak"] < 8 * MiB, mem
    assert time.monotonic() - start < 2


def test_a_header_declaring_more_than_the_cap_is_refused_before_any_data_is_read(tmp_path):
    dims = (100_000, 100, 100)  # 1 GB of data declared, above MAX_IDX_BYTES
    bomb = gzip_bomb(tmp_path / "big-idx3-ubyte.gz", idx_header(dims), mib=4)
    with counted_reads() as reads, pytest.raises(DataError) as err:
        data.read_idx(bomb)
    one_line(str(err.value), bomb, "100000 x 100 x 100 declare 1,000,000,000 bytes", "536,870,912 bytes allowed")
    assert reads["total"] == 16  # the header, nothing more
    with pytest.raises(DataError, match="more than the 1,000 bytes allowed"):
        data.read_idx(bomb, limit=1000)


def test_a_bomb_posing_as_fashion_mnist_is_refused_within_the_memory_of_the_real_file(tmp_path, real_files):
    d = fashion_dir(tmp_path / "d", real_files, **{"train-images-idx3-ubyte": None})
    bomb = gzip_bomb(d / "train-images-idx3-ubyte.gz", idx_header((60000, 28, 28)), mib=256)
    with peak_memory() as mem, pytest.raises(DataError) as err:
        sources.load("fashion-mnist", "train", d, download=False)
    one_line(str(err.value), bomb, f"unexpected trailing bytes after {TRAIN_IMAGES_BYTES} bytes of data")
    assert mem["peak"] < TRAIN_IMAGES_BYTES + 8 * MiB, mem  # the array it would have been, not 256 MiB


def test_a_header_declaring_more_images_than_the_data_set_has_is_refused_before_reading(tmp_path, real_files):
    d = fashion_dir(tmp_path / "d", real_files, **{"train-images-idx3-ubyte": None})
    gzip_bomb(d / "train-images-idx3-ubyte.gz", idx_header((1_000_000, 28, 28)), mib=64)
    with counted_reads() as reads, pytest.raises(DataError, match="1000000 images but .* has 60000 labels"):
        sources.load("fashion-mnist", "train", d, download=False)
    assert reads["total"] <= 16 + 8  # two headers


def test_nin_datasets_over_a_bomb_is_a_bad_row_in_bounded_memory(tmp_path, real_files, capsys):
    d = fashion_dir(tmp_path / "d", real_files, **{"train-images-idx3-ubyte": None})
    bomb = gzip_bomb(d / "train-images-idx3-ubyte.gz", idx_header((60000, 28, 28)), mib=256)
    with peak_memory() as mem:
        code = main(["datasets", "--data-dir", str(d), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    rows = {r["name"]: r for r in json.loads(out)}
    for name in ("fashion-mnist", "mnist"):  # the same file names: both look at the bomb
        assert rows[name]["found"] == str(d)
        assert rows[name]["checksum"].startswith(f"BAD: {bomb}: more than 1048576 unexpected trailing bytes")
    assert rows["cifar10"]["found"] == rows["cifar100"]["found"] == "not found"
    assert mem["peak"] < 8 * MiB, mem  # checked in a stream: not even the 47 MB the file declares


@pytest.mark.slow
def test_nin_datasets_streams_the_real_files_and_finds_them_good(tmp_path, real_files, capsys):
    d = fashion_dir(tmp_path / "d", real_files)
    with peak_memory() as mem:
        assert main(["datasets", "--data-dir", str(d), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fashion-mnist"]["checksum"] == "ok (SHA-256 of the decompressed files)"
    assert rows["mnist"]["checksum"].startswith("BAD: ") and "checksum mismatch" in rows["mnist"]["checksum"]
    assert mem["peak"] < 8 * MiB, mem


def test_a_downloaded_bomb_is_refused_in_a_stream_and_nothing_is_kept(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    gzip_bomb(mirror / "t10k-images-idx3-ubyte.gz", idx_header((10000, 28, 28)), mib=200)
    target = tmp_path / "target"
    target.mkdir()

    def opener(url, timeout):  # serves mirror/NAME for any URL ending in NAME
        return contextlib.nullcontext(io.BytesIO((mirror / url.rsplit("/", 1)[1]).read_bytes()))

    with peak_memory() as mem, pytest.raises(DataError) as err:
        sources.find_files(data.FASHION_MNIST, target, splits=["test"], opener=opener)
    assert "unexpected trailing bytes after 7840000 bytes of data" in str(err.value)
    assert list(target.iterdir()) == []
    assert mem["peak"] < 8 * MiB, mem  # the body (a quarter MiB) and a chunk, never the 200 MiB inside


# ---------------------------------------------------------------- CIFAR archives


def tar_gz(path: Path, headers_and_data: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A .tar.gz of raw member headers and data, as written: a header may declare more than follows."""
    raw = b"".join(info.tobuf(tarfile.GNU_FORMAT) + body for info, body in headers_and_data)
    path.write_bytes(gzip.compress(raw + bytes(1024)))
    return path


def test_an_archive_member_declaring_a_huge_size_is_refused_before_it_is_read(tmp_path):
    info = tarfile.TarInfo(f"{cifar.CIFAR10.folder}/data_batch_1")
    info.size = 2**40  # a terabyte declared; a few bytes follow
    path = tar_gz(tmp_path / cifar.CIFAR10.archive, [(info, bytes(512))])
    with peak_memory() as mem, pytest.raises(DataError) as err:
        cifar.read_archive(path, cifar.CIFAR10, "train")
    one_line(str(err.value), path, "refusing an archive member of 1,099,511,627,776 bytes", "67,108,864")
    assert mem["peak"] < 8 * MiB


def test_an_archive_member_just_above_the_cap_is_refused_and_cifar100_allows_its_big_batch(tmp_path):
    info = tarfile.TarInfo(f"{cifar.CIFAR10.folder}/batches.meta")
    info.size = cifar.CIFAR10.max_member + 1
    tar_gz(tmp_path / cifar.CIFAR10.archive, [(info, bytes(512))])
    with pytest.raises(DataError, match="refusing an archive member of 67,108,865 bytes"):
        cifar.load("cifar10", "test", tmp_path, download=False, verify=False)
    assert cifar.CIFAR100.max_member >= 160_000_000  # its "train" member holds 50,000 images (155 MB)


def test_an_archive_of_too_many_members_is_refused(tmp_path):
    members = []
    for i in range(cifar.MAX_MEMBERS + 1):
        info = tarfile.TarInfo(f"{cifar.CIFAR10.folder}/x{i}")
        members.append((info, b""))
    path = tar_gz(tmp_path / cifar.CIFAR10.archive, members)
    with pytest.raises(DataError, match=f"more than {cifar.MAX_MEMBERS} members"):
        cifar.read_archive(path, cifar.CIFAR10, "test")


@pytest.mark.parametrize("make, what", [
    (lambda p: p.mkdir(), "a directory, not a regular file"),
    (fifo, "a FIFO (named pipe), not a regular file"),
    (lambda p: link(p, "/dev/zero"), "a character device, not a regular file"),
    (loop, "a loop of symbolic links"),
])
def test_an_archive_path_that_is_not_a_regular_file_is_named(tmp_path, make, what):
    path = tmp_path / cifar.CIFAR10.archive
    make(path)
    with within(10):
        with pytest.raises(DataError) as err:
            cifar.load("cifar10", "test", tmp_path, download=False)
        one_line(str(err.value), path, what)
        for call in (cifar.md5_file, lambda p: cifar.read_archive(p, cifar.CIFAR10, "test")):
            with pytest.raises(DataError) as err:
                call(path)
            one_line(str(err.value), path, what)


# ---------------------------------------------------------------- images: the pixel cap


def test_a_12000_by_12000_png_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(12000, 12000))
    assert path.stat().st_size < 64 * 1024
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    with warnings.catch_warnings(), pytest.raises(decoding.ImageError) as err:
        warnings.simplefilter("error")  # Pillow's own bomb warning (above 89 M pixels) must not come first
        decoding.decode_image(path, 1, (28, 28), "crop")
    assert err.value.reason == ("12000x12000 = 144,000,000 pixels, above the cap of 67,108,864 "
                                "(raise it with --max-pixels)")
    one_line(str(err.value), path)
    assert decoding.MAX_PIXELS == 67_108_864 < Image.MAX_IMAGE_PIXELS


def test_an_image_above_pillows_own_limit_is_refused_in_our_words(tmp_path, monkeypatch):
    path = tmp_path / "huger.png"
    path.write_bytes(png_bytes(15000, 15000))  # 225 M pixels: Pillow raises its DecompressionBombError
    with pytest.raises(decoding.ImageError) as err:
        decoding.decode_image(path, 1, (28, 28), "crop")
    assert err.value.reason == "more than 178,956,970 pixels, above the cap of 67,108,864 (raise it with --max-pixels)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    path.write_bytes(png_bytes(3000, 3000))
    with pytest.raises(decoding.ImageError, match=r"Pillow's own limit .* which --max-pixels does not raise"):
        decoding.decode_image(path, 1, (28, 28), "crop", max_pixels=10_000_000)


def test_a_raised_cap_accepts_what_a_lower_one_refuses(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(3000, 3000))
    with pytest.raises(decoding.ImageError, match=r"3000x3000 = 9,000,000 pixels, above the cap of 1,000,000"):
        decoding.decode_image(path, 1, (28, 28), "crop", max_pixels=1_000_000)
    array = decoding.decode_image(path, 1, (28, 28), "crop", max_pixels=10_000_000)
    assert array.shape == (1, 28, 28) and array.dtype == np.uint8
    images, good, bad = predict.decode([path], 1, (28, 28), max_pixels=1_000_000)
    assert good == [] and bad == [(path, "3000x3000 = 9,000,000 pixels, above the cap of 1,000,000 "
                                         "(raise it with --max-pixels)")]
    images, good, bad = predict.decode([path], 1, (28, 28), max_pixels=10_000_000)
    assert good == [path] and bad == [] and images.shape == (1, 1, 28, 28)
    with pytest.raises(DataError, match="max_pixels must be a positive integer"):
        predict.decode([path], 1, (28, 28), max_pixels=0)


def test_a_cap_above_pillows_limit_is_ours_not_pillows_warning(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(3000, 3000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)  # 9M pixels: Pillow would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the decode
        array = decoding.decode_image(path, 1, (28, 28), "crop", max_pixels=10_000_000)
    assert array.shape == (1, 28, 28)
    before = list(warnings.filters)
    decoding.decode_image(path, 1, (28, 28), "crop", max_pixels=10_000_000)
    assert warnings.filters == before  # nothing left behind


def test_the_cap_is_threaded_through_image_folders_and_data_config(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / name / f"{i}.png")
    (root / "b" / "big.png").write_bytes(png_bytes(3000, 3000))
    with pytest.raises(DataError) as err:
        folder.load_image_folder(root, channels=1, size=(8, 8), max_pixels=1_000_000)
    one_line(str(err.value), root / "b" / "big.png", "above the cap of 1,000,000", "--skip-bad-images")
    split = folder.load_image_folder(root, channels=1, size=(8, 8), max_pixels=1_000_000, on_error="skip",
                                     cache_dir=tmp_path / "c")
    assert [rel for rel, _ in split.skipped] == ["b/big.png"] and "above the cap" in split.skipped[0][1]
    raised = folder.load_image_folder(root, channels=1, size=(8, 8), max_pixels=10_000_000, cache_dir=tmp_path / "c")
    assert "b/big.png" in raised.files and raised.skipped == ()  # the cache of the lower cap is not reused
    cfg = DataConfig(dataset=f"folder:{root}", max_pixels=1_000_000)
    with pytest.raises(DataError, match="above the cap of 1,000,000"):
        load_splits(cfg, channels=1, size=(8, 8), seed=0)
    cfg.max_pixels = 10_000_000
    splits, skipped = load_splits(cfg, channels=1, size=(8, 8), seed=0)
    assert skipped == [] and len(splits["train"].images) + len(splits["test"].images) == 7


# ---------------------------------------------------------------- images: FIFOs, devices, loops


@pytest.mark.parametrize("make, what", [
    (fifo, "a FIFO (named pipe), not a regular file"),
    (lambda p: link(p, "/dev/zero"), "a character device, not a regular file"),
    (loop, "a loop of symbolic links"),
    (lambda p: p, "no such file or directory"),
])
def test_an_image_that_is_not_a_regular_file_is_named_never_read(tmp_path, make, what):
    path = make(tmp_path / "x.png")
    with within(10):
        images, good, bad = predict.decode([path], 1, (28, 28))
        assert good == [] and bad == [(path, what)] and images.shape == (0, 1, 28, 28)
        with pytest.raises(decoding.ImageError) as err:
            decoding.decode_image(path, 3, (8, 8), "crop")
        one_line(str(err.value), path, what)


def test_a_fifo_among_images_is_reported_and_the_rest_decode(tmp_path):
    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 100).save(good)
    pipe = fifo(tmp_path / "pipe.png")
    with within(10):
        assert predict.expand([str(tmp_path)]) == [good, pipe]  # listed, not passed over
        images, ok, bad = predict.decode(predict.expand([str(tmp_path)]), 1, (8, 8))
    assert ok == [good] and bad == [(pipe, "a FIFO (named pipe), not a regular file")]


def test_nin_predict_on_a_fifo_is_one_line_not_a_hang(tmp_path, tiny_run, capsys):
    pipe = fifo(tmp_path / "pipe.png")
    with within(60):
        code = main(["predict", str(tiny_run), str(pipe)])
    assert code == 2
    assert capsys.readouterr().err == f"nin: error: {pipe}: a FIFO (named pipe), not a regular file\n"


@pytest.mark.parametrize("make, what", [
    (fifo, "a FIFO (named pipe), not a regular file"),
    (lambda p: link(p, "/dev/zero"), "a character device, not a regular file"),
    (loop, "a loop of symbolic links"),
])
def test_an_image_folder_with_such_an_entry_names_it(tmp_path, make, what):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / name / "ok.png")
    bad = make(root / "b" / "bad.png")
    with within(10):
        with pytest.raises(DataError) as err:
            folder.load_image_folder(root, channels=1, size=(8, 8), workers=1)
        one_line(str(err.value), bad, what, "--skip-bad-images")
        split = folder.load_image_folder(root, channels=1, size=(8, 8), workers=1, on_error="skip")
    assert split.skipped == (("b/bad.png", what),)


def test_an_image_folder_root_must_be_a_folder_and_loops_in_it_are_named(tmp_path):
    with pytest.raises(DataError, match="image folder does not exist") as err:
        folder.load_image_folder(tmp_path / "missing", channels=1, size=(8, 8))
    one_line(str(err.value), tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(DataError, match="a regular file, not a folder"):
        folder.load_image_folder(tmp_path / "file", channels=1, size=(8, 8))
    with within(10), pytest.raises(DataError, match="a FIFO \\(named pipe\\), not a folder"):
        folder.load_image_folder(fifo(tmp_path / "pipe"), channels=1, size=(8, 8))
    root = tmp_path / "root"
    root.mkdir()
    loop(root / "cls")
    with pytest.raises(DataError) as err:  # was an OSError from os.scandir's is_dir
        folder.load_image_folder(root, channels=1, size=(8, 8))
    one_line(str(err.value), root / "cls", "a loop of symbolic links")


def test_a_test_dir_that_is_missing_or_a_file_is_named(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 50 * i).save(root / name / f"{i}.png")
    (tmp_path / "file").write_bytes(b"")
    for test_dir, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "not a folder")):
        cfg = DataConfig(dataset=f"folder:{root}", test_dir=str(test_dir))
        with pytest.raises(DataError) as err:
            load_splits(cfg, channels=1, size=(8, 8), seed=0)
        one_line(str(err.value), test_dir, what)


# ---------------------------------------------------------------- IDX files that are not regular files


READ_EACH = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a reader that streams /dev/zero fails, not the machine
from nin.data.idx import DataError, read_idx
for path in sys.argv[1:]:
    try:
        read_idx(path)
        print("read")
    except DataError as e:
        print(e)
"""


@pytest.mark.slow
def test_an_idx_file_that_is_not_a_regular_file_is_named(tmp_path):
    # In a child with an address-space limit and a timeout: a reader that opens a FIFO blocks, and one that
    # reads a link to /dev/zero to its end allocates without bound (which is what this guards against).
    cases = {fifo(tmp_path / "fifo-idx1-ubyte"): "a FIFO (named pipe), not a regular file",
             link(tmp_path / "zero-idx1-ubyte", "/dev/zero"): "a character device, not a regular file",
             loop(tmp_path / "loop-idx1-ubyte"): "a loop of symbolic links",
             tmp_path / "dir-idx1-ubyte": "a directory, not a regular file"}
    (tmp_path / "dir-idx1-ubyte").mkdir()
    done = subprocess.run([sys.executable, "-c", READ_EACH, *map(str, cases)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"{path}: cannot read: {what}" for path, what in cases.items()]


@pytest.mark.parametrize("make, what", [
    (lambda p: p.mkdir(), "a directory, not a regular file"),
    (fifo, "a FIFO (named pipe), not a regular file"),
    (lambda p: link(p, "/dev/zero"), "a character device, not a regular file"),
    (loop, "a loop of symbolic links"),
    (lambda p: link(p, "gone"), "a symbolic link to gone, which does not exist"),
])
def test_a_data_file_that_is_not_a_regular_file_is_an_error_not_skipped(tmp_path, real_files, make, what):
    # the .gz next to it would do: the name the user most likely meant is not passed over in silence
    d = fashion_dir(tmp_path / "d", real_files)
    bad = tmp_path / "d" / "train-images-idx3-ubyte"
    make(bad)
    with within(10), pytest.raises(DataError) as err:
        sources.find_files("fashion-mnist", d, download=False)
    one_line(str(err.value), bad, what)


def test_a_data_file_that_is_a_directory_in_the_cache_is_named(tmp_path, real_files):
    (sources.cache_dir("fashion-mnist") / "t10k-labels-idx1-ubyte").mkdir(parents=True)
    with pytest.raises(DataError) as err:  # was: passed over for the Debian package's copy
        sources.load("fashion-mnist", "test", download=False)
    one_line(str(err.value), sources.cache_dir("fashion-mnist") / "t10k-labels-idx1-ubyte", "a directory")


# ---------------------------------------------------------------- a named data directory is the one used


def test_a_missing_data_dir_is_an_error_even_when_the_data_is_elsewhere(tmp_path, real_files):
    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError) as err:  # was: trained on the Debian package's copy without a word
        sources.find_files("fashion-mnist", missing, download=False)
    one_line(str(err.value), missing, "no such directory")
    with pytest.raises(DataError, match="no such directory"):
        sources.find_files("fashion-mnist", missing)  # nor is it created to download into
    assert not missing.exists()


def test_a_data_dir_that_is_a_file_is_an_error(tmp_path, real_files):
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(DataError) as err:
        sources.find_files("fashion-mnist", afile, download=False)
    one_line(str(err.value), afile, "a regular file, not a folder")
    with pytest.raises(DataError, match="a loop of symbolic links"):
        sources.find_files("fashion-mnist", loop(tmp_path / "loop"), download=False)


def test_a_missing_nin_data_dir_is_an_error_naming_it(tmp_path, real_files, monkeypatch):
    monkeypatch.setenv("NIN_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        sources.load("fashion-mnist", "test", download=False)
    one_line(str(err.value), f"NIN_DATA_DIR={tmp_path / 'nowhere'}", "no such directory")


def test_a_named_data_dir_is_the_only_place_looked(tmp_path, real_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sources.search_dirs("fashion-mnist", empty) == [empty]
    with pytest.raises(data.NotFoundError) as err:  # the Debian package's copy is not used instead
        sources.find_files("fashion-mnist", empty, download=False)
    one_line(str(err.value), empty, "downloading was disabled")
    assert str(real_files["t10k-images-idx3-ubyte"].parent) not in str(err.value)
    d = fashion_dir(tmp_path / "d", real_files)
    assert {p.parent for p in sources.find_files("fashion-mnist", d, download=False).values()} == {d}


def test_a_named_cifar_dir_must_exist_and_is_the_only_place_looked(tmp_path):
    cache = cifar.cache_dir("cifar10")
    cache.mkdir(parents=True)
    make_cifar_archive(cache / cifar.CIFAR10.archive, cifar.CIFAR10, {"train": 10, "test": 10})
    assert len(cifar.load("cifar10", "test", download=False, verify=False).images) == 10  # from the cache
    with pytest.raises(DataError, match="no such directory"):
        cifar.load("cifar10", "test", tmp_path / "missing", download=False, verify=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no {cifar.CIFAR10.archive} in {tmp_path / 'empty'} "):
        cifar.load("cifar10", "test", tmp_path / "empty", download=False, verify=False)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_nin_train_with_a_bad_data_dir_is_one_line(tmp_path, real_files, capsys, kind):
    bad = tmp_path / "bad"
    if kind == "file":
        bad.write_bytes(b"")
    code = main(["train", "--data-dir", str(bad), "--epochs", "1", "--subset", "64", "--out", str(tmp_path / "r"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("nin: error: ")
    one_line(err.rstrip("\n"), bad, "no such directory" if kind == "missing" else "a regular file, not a folder")


def test_nin_datasets_with_a_missing_data_dir_is_one_line(tmp_path, capsys):
    assert main(["datasets", "--data-dir", str(tmp_path / "missing")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(tmp_path / "missing") in err and "no such directory" in err


def test_nin_datasets_with_a_data_dir_shows_that_directory_only(tmp_path, real_files, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["datasets", "--data-dir", str(tmp_path / "empty"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["found"] for r in rows} == {"not found"}  # the Debian package's Fashion-MNIST is not shown


# ---------------------------------------------------------------- the IDX header, by Hypothesis

LIMIT = 4096
EDGE = (0, 1, 2, 3, 255, 256, 4096, 65535, 2**31, 2**32 - 1)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(type_code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]),
       dims=st.lists(st.sampled_from(EDGE) | st.integers(0, 9), max_size=6),
       ndim=st.none() | st.integers(0, 255),
       extra=st.integers(-3, 3), gz=st.booleans())
def test_the_streaming_reader_takes_any_header(type_code, dims, ndim, extra, gz):
    header = bytes([0, 0, type_code, len(dims) if ndim is None else ndim]) + struct.pack(f">{len(dims)}I", *dims)
    declared = int(np.prod(dims, dtype=object)) if dims else 0
    body = bytes(range(256)) * (LIMIT // 256 + 1)
    raw = header + body[:max(0, min(declared, LIMIT) + extra)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h-idx-ubyte"
        path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        with counted_reads() as reads:
            try:
                array = data.read_idx(path, limit=LIMIT)
            except DataError as e:
                one_line(str(e), path)
                array = None
    assert reads["total"] <= 4 + 4 * 255 + LIMIT + data.TRAILING_BYTES_COUNTED + 1
    if array is not None:  # exactly what the file's own header declares, and its bytes
        n = raw[3]
        shape = struct.unpack(f">{n}I", raw[4:4 + 4 * n])
        assert raw[2] == 0x08 and array.dtype == np.uint8 and array.shape == shape
        assert array.tobytes() == raw[4 + 4 * n:] and array.flags.writeable
