"""Tests for nin.data: IDX parsing, data set lookup, download and loading."""

from __future__ import annotations

import gzip
import hashlib
import re
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from nin.data import idx as data
from nin.data import sources
from nin.data.idx import DataError, IdxDataset

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = types.MappingProxyType({
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
})
COUNTS = types.MappingProxyType({"train": 6, "test": 4})
NUM_CLASSES = 3
PACKAGE = "nin-test-no-such-package"


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Valid IDX bytes for a uint8 array."""
    header = bytes([0, 0, type_code, array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    """Write ``payload`` to ``path`` (plus ``.gz`` and compressed when ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def split_arrays(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small deterministic images [N, 4, 4] and labels [N] for a split."""
    rng = np.random.default_rng(seed + len(split))
    n = COUNTS[split]
    images = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
    return images, labels


def make_files(directory: Path, gz: bool = True, seed: int = 0) -> dict[str, bytes]:
    """Write all four files of the fake data set; return decompressed bytes by name."""
    contents: dict[str, bytes] = {}
    for split, (images_name, labels_name) in FILES.items():
        images, labels = split_arrays(split, seed)
        contents[images_name] = idx_bytes(images)
        contents[labels_name] = idx_bytes(labels)
    for name, payload in contents.items():
        write(directory / name, payload, gz)
    return contents


def digests(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(payload).hexdigest() for name, payload in contents.items()}


def make_spec(tmp_path: Path, sha256=None, mirrors=("file:///nonexistent/",)) -> IdxDataset:
    """A test-only spec whose Debian dir is ``tmp_path/debian``."""
    return IdxDataset(
        name="fake",
        files=FILES,
        sha256=types.MappingProxyType(sha256 or {}),
        counts=COUNTS,
        image_shape=(1, 4, 4),
        classes=("a", "b", "c"),
        mirrors=tuple(mirrors),
        debian_package=PACKAGE,
        debian_dir=tmp_path / "debian",
    )


def failing_opener(url, timeout=None):
    raise urllib.error.URLError("network is unreachable")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep the user's NIN_DATA_DIR and cache out of every test."""
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write(tmp_path / "x-idx3-ubyte", idx_bytes(array), gz)
    result = data.read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def test_gzip_detected_by_magic_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    gz_without_suffix = tmp_path / "labels"
    gz_without_suffix.write_bytes(gzip.compress(idx_bytes(array)))
    raw_with_suffix = tmp_path / "labels.gz"
    raw_with_suffix.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(data.read_idx(raw_with_suffix), array)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(tmp_path, gz):
    payload = idx_bytes(np.zeros((2, 4, 4), dtype=np.uint8))[:-1]
    path = write(tmp_path / "img", payload, gz)
    with pytest.raises(DataError, match=r"truncated: expected 32 bytes of data, found 31") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_header(tmp_path):
    path = write(tmp_path / "img", bytes([0, 0, 8, 3, 0, 0]), gz=False)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path)


def test_trailing_bytes(tmp_path):
    payload = idx_bytes(np.zeros((2, 4, 4), dtype=np.uint8)) + b"\x00\x01"
    path = write(tmp_path / "img", payload, gz=True)
    with pytest.raises(DataError, match="2 unexpected trailing bytes") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_bad_magic(tmp_path):
    payload = b"\x12\x34" + idx_bytes(np.zeros(3, dtype=np.uint8))[2:]
    path = write(tmp_path / "img", payload, gz=False)
    with pytest.raises(DataError, match="not an IDX file") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_too_short(tmp_path):
    path = write(tmp_path / "img", b"\x00\x00", gz=False)
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(path)


def test_unsupported_type_code(tmp_path):
    payload = idx_bytes(np.zeros(4, dtype=np.uint8), type_code=0x0D)
    path = write(tmp_path / "img", payload, gz=False)
    with pytest.raises(DataError, match=r"0x0d \(float32\)"):
        data.read_idx(path)


def test_zero_dimensions(tmp_path):
    path = write(tmp_path / "img", bytes([0, 0, 8, 0]), gz=False)
    with pytest.raises(DataError, match="zero dimensions"):
        data.read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx(tmp_path / "absent")


def gz_of_images() -> bytes:
    rng = np.random.default_rng(1)
    return gzip.compress(idx_bytes(rng.integers(0, 256, size=(50, 8, 8), dtype=np.uint8)))


@pytest.mark.parametrize("damage", ["truncate", "flip_middle", "bad_crc"])
def test_corrupt_gzip(tmp_path, damage):
    blob = bytearray(gz_of_images())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_middle":
        middle = len(blob) // 2
        for i in range(middle, middle + 16):
            blob[i] ^= 0xFF
    else:
        blob[-8] ^= 0xFF  # CRC32 field of the gzip trailer
    path = tmp_path / "img.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt gzip") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- specs


def test_registry_is_read_only():
    assert set(data.DATASETS) == {"fashion-mnist", "mnist"}
    with pytest.raises(TypeError):
        data.DATASETS["other"] = data.MNIST  # type: ignore[index]
    with pytest.raises(AttributeError):
        data.MNIST.name = "x"  # type: ignore[misc]
    for spec in data.DATASETS.values():
        assert set(spec.sha256) == set(spec.filenames)
        assert all(len(d) == 64 for d in spec.sha256.values())
        assert spec.counts == {"train": 60000, "test": 10000}
        assert spec.image_shape == (1, 28, 28)


def test_class_names():
    assert data.class_names("mnist") == tuple("0123456789")
    names = data.class_names("fashion-mnist")
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[-1] == "Ankle boot"


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        data.class_names("cifar")
    with pytest.raises(DataError, match="no split 'valid'"):
        sources.load_split(make_spec(tmp_path), "valid", data_dir=tmp_path)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("gz", [False, True])
def test_load_split(tmp_path, gz):
    contents = make_files(tmp_path / "d", gz=gz)
    spec = make_spec(tmp_path, sha256=digests(contents))
    images, labels = sources.load_split(spec, "train", data_dir=tmp_path / "d", download=False)
    expected_images, expected_labels = split_arrays("train")
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 4, 4)
    assert images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (6,)
    np.testing.assert_array_equal(images[:, 0].numpy(), expected_images)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)

    loaded = sources.load(spec, "test", data_dir=tmp_path / "d", download=False)
    assert loaded.classes == ("a", "b", "c")
    assert loaded.images.shape == (4, 1, 4, 4)
    assert loaded.images_path.parent == tmp_path / "d"


def test_count_mismatch_between_images_and_labels(tmp_path):
    make_files(tmp_path, gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, dtype=np.uint8)), gz=False)
    with pytest.raises(DataError, match="6 images but .* has 5 labels"):
        sources.load_split(make_spec(tmp_path), "train", data_dir=tmp_path, download=False)


def test_count_mismatch_with_spec(tmp_path):
    make_files(tmp_path, gz=False)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((3, 4, 4), np.uint8)), gz=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)), gz=False)
    with pytest.raises(DataError, match="3 images, expected 4"):
        sources.load_split(make_spec(tmp_path), "test", data_dir=tmp_path, download=False)


def test_wrong_image_shape(tmp_path):
    make_files(tmp_path, gz=False)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((4, 5, 4), np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"expected \(N, 4, 4\)"):
        sources.load_split(make_spec(tmp_path), "test", data_dir=tmp_path, download=False)


def test_labels_out_of_range(tmp_path):
    make_files(tmp_path, gz=False)
    bad = np.array([0, 1, 2, 3], dtype=np.uint8)
    path = write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(bad), gz=False)
    with pytest.raises(DataError, match="label 3 out of range for 3 classes") as err:
        sources.load_split(make_spec(tmp_path), "test", data_dir=tmp_path, download=False)
    assert str(path) in str(err.value)


def test_checksum_mismatch_names_file(tmp_path):
    contents = make_files(tmp_path, gz=True)
    sums = digests(contents)
    sums["t10k-images-idx3-ubyte"] = "ab" * 32
    spec = make_spec(tmp_path, sha256=sums)
    with pytest.raises(DataError, match="checksum mismatch") as err:
        sources.load_split(spec, "test", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert "abababab" in message
    assert sums["t10k-images-idx3-ubyte"] not in message  # a prefix, not the full digest
    assert digests(contents)["t10k-images-idx3-ubyte"][:16] in message
    # verify=False skips the digest but still parses and checks the data
    images, _ = sources.load_split(spec, "test", data_dir=tmp_path, download=False, verify=False)
    assert images.shape == (4, 1, 4, 4)


# ---------------------------------------------------------------- lookup


def test_lookup_order(tmp_path, monkeypatch):
    spec = make_spec(tmp_path)
    user, cache, debian = tmp_path / "user", sources.cache_dir(spec), tmp_path / "debian"
    for directory in (user, cache, debian):
        make_files(directory)
    assert cache == tmp_path / "cache" / "nin" / "fake"

    def images_dir(**kwargs) -> Path:
        found = sources.find_files(spec, download=False, **kwargs)
        return found["train-images-idx3-ubyte"].parent

    assert images_dir(data_dir=user) == user
    monkeypatch.setenv("NIN_DATA_DIR", str(user))
    assert images_dir() == user
    monkeypatch.delenv("NIN_DATA_DIR")
    assert images_dir() == cache
    for path in cache.iterdir():
        path.unlink()
    assert images_dir() == debian
    # a named directory is the only place looked: it must exist, and data elsewhere is not used instead
    with pytest.raises(DataError, match="empty: no such directory"):
        images_dir(data_dir=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.NotFoundError, match="no .* in " + re.escape(f"{tmp_path / 'empty'}. ")):
        images_dir(data_dir=tmp_path / "empty")


def test_plain_file_preferred_over_gz(tmp_path):
    make_files(tmp_path, gz=True)
    make_files(tmp_path, gz=False)
    found = sources.find_files(make_spec(tmp_path), tmp_path, download=False, splits=["test"])
    assert set(found) == {"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    assert all(path.suffix != ".gz" for path in found.values())


def test_offline_message(tmp_path):
    spec = make_spec(tmp_path, mirrors=("http://mirror.invalid/fake/",))
    (tmp_path / "empty").mkdir()  # a named directory must exist
    with pytest.raises(DataError) as err:
        sources.load_split(spec, "test", data_dir=tmp_path / "empty", opener=failing_opener)
    message = str(err.value)
    assert "\n" not in message
    assert "--data-dir" in message and "NIN_DATA_DIR" in message
    assert f"apt-get install {PACKAGE}" in message
    assert "http://mirror.invalid/fake/" in message
    assert "network is unreachable" in message
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_offline_message_with_unreachable_file_url(tmp_path):
    spec = make_spec(tmp_path, mirrors=((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(DataError, match="--data-dir.*apt-get install.*file://"):
        sources.find_files(spec)


def test_no_download_message(tmp_path):
    with pytest.raises(DataError, match="downloading was disabled") as err:
        sources.find_files(make_spec(tmp_path), download=False)
    assert "--data-dir" in str(err.value) and PACKAGE in str(err.value)


def test_real_spec_message_names_debian_package(tmp_path):
    message = sources.how_to_get(data.FASHION_MNIST, ["t10k-images-idx3-ubyte"], [tmp_path])
    assert "apt-get install dataset-fashion-mnist" in message
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com" in message
    assert "apt-get" not in sources.how_to_get(data.MNIST, ["x"], [tmp_path])


# ---------------------------------------------------------------- download


def test_download_into_data_dir(tmp_path):
    contents = make_files(tmp_path / "mirror", gz=True)
    spec = make_spec(tmp_path, sha256=digests(contents), mirrors=(
        "http://mirror.invalid/",  # unreachable: the next mirror is tried
        (tmp_path / "mirror").as_uri() + "/",
    ))
    target = tmp_path / "target"
    target.mkdir()  # a named directory must exist; missing files are downloaded into it
    images, labels = sources.load_split(spec, "test", data_dir=target)
    assert images.shape == (4, 1, 4, 4) and labels.shape == (4,)
    assert sorted(p.name for p in target.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert not (tmp_path / "cache").exists()


def test_download_into_cache(tmp_path):
    contents = make_files(tmp_path / "mirror", gz=True)
    spec = make_spec(tmp_path, sha256=digests(contents),
                     mirrors=((tmp_path / "mirror").as_uri(),))
    found = sources.find_files(spec)
    cache = tmp_path / "cache" / "nin" / "fake"
    assert {p.parent for p in found.values()} == {cache}
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in contents)


def test_download_checksum_failure_leaves_nothing(tmp_path):
    contents = make_files(tmp_path / "mirror", gz=True)
    sums = digests(contents)
    sums["t10k-images-idx3-ubyte"] = "cd" * 32
    spec = make_spec(tmp_path, sha256=sums, mirrors=((tmp_path / "mirror").as_uri() + "/",))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DataError, match="checksum mismatch") as err:
        sources.find_files(spec, data_dir=target, splits=["test"])
    assert "t10k-images-idx3-ubyte" in str(err.value)
    assert "cdcdcdcd" in str(err.value)
    assert not target.exists() or not any(target.iterdir())


def test_download_corrupt_body_leaves_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "x.gz").write_bytes(gz_of_images()[:100])
    dest = tmp_path / "target" / "x.gz"
    with pytest.raises(DataError, match="corrupt gzip"):
        sources.download_file([(mirror / "x.gz").as_uri()], dest, None)
    assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_download_never_overwrites(tmp_path):
    dest = tmp_path / "x.gz"
    dest.write_bytes(b"existing")
    calls = []

    def opener(url, timeout=None):
        calls.append(url)
        raise AssertionError("must not download")

    assert sources.download_file(["http://mirror.invalid/x.gz"], dest, None, opener) == dest
    assert dest.read_bytes() == b"existing" and calls == []


def test_write_atomically_keeps_existing(tmp_path):
    dest = tmp_path / "x"
    dest.write_bytes(b"old")
    sources.write_atomically(dest, b"new")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (REAL_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not installed at {REAL_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split():
    loaded = sources.load("fashion-mnist", "test", download=False, verify=True)
    images, labels = loaded.images, loaded.labels
    assert images.shape == (10000, 1, 28, 28)
    assert images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (10000,)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert loaded.images_path.parent == REAL_DIR
    assert int(images.max()) == 255 and int(images.min()) == 0
