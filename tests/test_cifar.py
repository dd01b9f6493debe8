"""CIFAR-10/100 from python-version archives generated in the official layout: loading, the restricted
unpickler, unsafe and corrupt archives, checksums, the decoded cache, downloads, and the nin-cifar10 preset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cifar_archive

from nin.cli.main import main
from nin.data import cifar
from nin.data.cifar import CIFAR10, CIFAR100, load, unpickle_batch
from nin.data.idx import DataError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)


@pytest.fixture
def c10(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    make_cifar_archive(d / CIFAR10.archive, CIFAR10, {"train": 250, "test": 60})
    return d


def test_cifar10_loads_all_batches_as_uint8_with_the_archives_class_names(c10):
    train = load("cifar10", "train", c10, download=False, verify=False)
    test = load("cifar10", "test", c10, download=False, verify=False)
    assert train.images.shape == (250, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (60, 3, 32, 32) and test.labels.dtype == torch.int64
    assert train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # in batch order, 5 batches concatenated
    assert test.labels[0] == 250 % 10
    assert train.classes == tuple(f"class{i}" for i in range(10))


def test_pixels_are_laid_out_as_channel_planes(tmp_path):
    """The 3072 bytes of a row are the red plane, then green, then blue, each row-major 32x32."""
    row = np.arange(3072, dtype=np.int64) % 251
    batch = pickle.dumps({b"data": row.astype(np.uint8)[None], b"labels": [3]}, protocol=2)
    meta = pickle.dumps({b"label_names": [b"x%d" % i for i in range(10)]}, protocol=2)
    path = tmp_path / CIFAR10.archive
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in [("batches.meta", meta), ("test_batch", batch)]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    split = load("cifar10", "test", tmp_path, download=False, verify=False)
    assert split.images[0, 1, 0, 0] == 1024 % 251 and split.images[0, 0, 1, 0] == 32 and split.labels.tolist() == [3]


def test_cifar100_uses_fine_labels(tmp_path):
    make_cifar_archive(tmp_path / CIFAR100.archive, CIFAR100, {"train": 300, "test": 100})
    split = load("cifar100", "train", tmp_path, download=False, verify=False)
    assert len(split.classes) == 100 and int(split.labels.max()) == 99 and len(split.images) == 300


def test_the_published_checksum_is_checked(c10):
    with pytest.raises(DataError, match="checksum mismatch: expected MD5 c58f30108f718f92721af3b95e74349a"):
        load("cifar10", "train", c10, download=False)


def test_a_pickle_that_would_run_code_is_refused():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        unpickle_batch(pickle.dumps({"data": Evil()}), "evil")
    with pytest.raises(DataError, match="refusing the codec|refusing to load"):
        unpickle_batch(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.", "codec")


@pytest.mark.parametrize("name, kind", [("../escape", tarfile.REGTYPE), ("/abs/path", tarfile.REGTYPE),
                                        ("cifar-10-batches-py/link", tarfile.SYMTYPE)])
def test_archives_with_unsafe_members_are_refused(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    make_cifar_archive(tmp_path / CIFAR10.archive, CIFAR10, {"train": 10, "test": 10},
                       extra_members=[(info, b"" if kind == tarfile.REGTYPE else None)])
    with pytest.raises(DataError, match="refusing an archive") as e:
        load("cifar10", "test", tmp_path, download=False, verify=False)
    assert CIFAR10.archive in str(e.value)
    assert not (tmp_path.parent / "escape").exists()


def test_truncated_and_garbage_archives_name_the_file(c10):
    path = c10 / CIFAR10.archive
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated archive") as e:
        load("cifar10", "train", c10, download=False, verify=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(b"not a tarball at all")
    with pytest.raises(DataError, match=f"{path}: corrupt or truncated archive"):
        load("cifar10", "test", c10, download=False, verify=False)


@pytest.mark.parametrize("labels_fn, match", [(lambda ls: [v + 10 for v in ls], "labels must be in"),
                                              (lambda ls: ls[:-1], "must be a list of")])
def test_bad_labels_are_refused(tmp_path, labels_fn, match):
    make_cifar_archive(tmp_path / CIFAR10.archive, CIFAR10, {"train": 20, "test": 20}, labels_fn=labels_fn)
    with pytest.raises(DataError, match=match):
        load("cifar10", "test", tmp_path, download=False, verify=False)


def test_a_member_missing_from_the_archive_is_named(tmp_path):
    make_cifar_archive(tmp_path / CIFAR10.archive, CIFAR100, {"train": 10, "test": 10})  # CIFAR-100 inside
    with pytest.raises(DataError, match="no cifar-10-batches-py/batches.meta in the archive"):
        load("cifar10", "test", tmp_path, download=False, verify=False)


def test_the_decoded_split_is_cached_and_the_cache_follows_the_archive(c10, monkeypatch):
    first = load("cifar10", "train", c10, download=False, verify=False)
    monkeypatch.setattr(cifar, "read_archive", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load("cifar10", "train", c10, download=False, verify=False)
    assert torch.equal(first.images, again.images) and first.classes == again.classes
    monkeypatch.undo()
    make_cifar_archive(c10 / CIFAR10.archive, CIFAR10, {"train": 100, "test": 60}, seed=1)  # a changed archive
    assert len(load("cifar10", "train", c10, download=False, verify=False).images) == 100


def test_a_corrupt_cache_file_is_ignored(c10):
    load("cifar10", "test", c10, download=False, verify=False)
    (cached,) = cifar.cache_dir("cifar10").glob("test-*.safetensors")
    cached.write_bytes(b"garbage")
    assert len(load("cifar10", "test", c10, download=False, verify=False).images) == 60


def test_missing_archive_offline_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as e:
        load("cifar10", "train", tmp_path, download=False)
    assert "https://www.cs.toronto.edu/~kriz/" in str(e.value) and "--data-dir" in str(e.value)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_is_verified_before_it_is_kept(tmp_path, c10):
    body = (c10 / CIFAR10.archive).read_bytes()
    spec = cifar.CifarDataset(**{**CIFAR10.__dict__, "md5": hashlib.md5(body).hexdigest(),
                                 "counts": {"train": 250, "test": 60}})
    seen = []

    def opener(url, timeout):
        seen.append(url)
        return FakeResponse(body)

    target = tmp_path / "fresh"
    target.mkdir()  # a named directory must exist; the archive is downloaded into it
    split = load(spec, "test", target, opener=opener)
    assert seen == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"] and len(split.images) == 60
    assert (target / CIFAR10.archive).read_bytes() == body

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DataError, match="checksum mismatch"):
        load(spec, "test", bad, opener=lambda url, timeout: FakeResponse(body[:-1] + b"x"))
    assert not (bad / CIFAR10.archive).exists()


@pytest.mark.slow
def test_preset_nin_cifar10_is_the_papers_recipe_and_trains_on_a_cifar_archive(capsys, tmp_path, c10):
    from nin.training.config import preset

    cfg = preset("nin-cifar10")
    d = cfg.data
    assert (cfg.model.name, d.dataset, d.crop_padding, d.flip) == ("nin_cifar10", "cifar10", 4, True)
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.schedule, t.gamma) == (0.1, 0.9, 1e-4, "step", 0.1)
    out = tmp_path / "run"
    code = main(["train", "--preset", "nin-cifar10", "--data-dir", str(c10), "--no-checksum", "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "32", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads(next(out.glob("checkpoints/*/meta.json")).read_text())
    assert meta["model"]["options"]["in_channels"] == 3 and meta["data"]["classes"][0] == "class0"
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 60


def test_training_on_cifar_takes_its_channels_and_a_wrong_class_count_is_one_line(capsys, tmp_path, c10):
    code = main(["train", "--model", "nin28", "--dataset", "cifar10", "--data-dir", str(c10), "--no-checksum",
                 "--resize", "28", "--num-classes", "5", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cifar10 has 10" in err


def test_datasets_lists_where_each_set_is_and_its_checksum(capsys, c10):
    assert main(["datasets", "--data-dir", str(c10), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"fashion-mnist", "mnist", "cifar10", "cifar100"}
    assert rows["cifar10"]["found"] == str(c10 / CIFAR10.archive) and rows["cifar10"]["checksum"].startswith("BAD")
    assert rows["cifar100"]["found"] == "not found" and rows["cifar10"]["shape"] == "3x32x32"
