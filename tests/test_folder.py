"""Tests for nin.data.folder: image-folder data sets decoded with Pillow and cached."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from nin.data import folder
from nin.data import images as decoding
from nin.data.folder import FolderSplit, load_image_folder, split_folder
from nin.data.idx import DataError

RED = (255, 0, 0)

# ---------------------------------------------------------------- helpers


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def solid(root: Path, rel: str, colour=(10, 20, 30), size=(6, 4)) -> Path:
    return save(root / rel, Image.new("RGB", size, colour))


def write_bytes(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def truncated_png(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    save(path, Image.fromarray(noise))
    data = path.read_bytes()
    return write_bytes(path, data[: len(data) // 2])


def load(root: Path, **kwargs) -> FolderSplit:
    options = {"channels": 3, "size": (8, 8), "workers": 1}
    return load_image_folder(root, **{**options, **kwargs})


def pixels(split: FolderSplit, rel: str) -> np.ndarray:
    """The decoded image of one file as [H, W, C]."""
    return split.images[split.files.index(rel)].permute(1, 2, 0).numpy()


def one_image(tmp_path: Path, img: Image.Image, suffix: str = ".png", **kwargs) -> np.ndarray:
    """Save ``img`` as the only image of a one-class folder, load it, return it as [H, W, C]."""
    save(tmp_path / "data" / "only" / f"img{suffix}", img)
    return pixels(load(tmp_path / "data", **kwargs), f"only/img{suffix}")


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Three classes of PNG/JPEG/GIF files in many sizes and modes, plus files that must be ignored."""
    root = tmp_path / "mixed"
    save(root / "cat" / "grey.png", Image.new("L", (20, 10), 90))
    save(root / "cat" / "rgb.JPG", Image.new("RGB", (13, 17), (0, 128, 255)))
    save(root / "cat" / "rgba.png", Image.new("RGBA", (9, 9), (255, 0, 0, 128)))
    save(root / "cat" / "deep.png", Image.fromarray(np.full((7, 11), 257 * 40, dtype=np.uint16)))
    palette = Image.new("P", (12, 5), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    save(root / "dog" / "palette.png", palette, transparency=0)
    save(root / "dog" / "cmyk.jpeg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))
    save(root / "dog" / "la.png", Image.new("LA", (5, 30), (30, 255)))
    frames = [Image.new("RGB", (10, 10), colour) for colour in (RED, (0, 255, 0), (0, 0, 255))]
    (root / "bird").mkdir()
    frames[0].save(root / "bird" / "anim.gif", save_all=True, append_images=frames[1:])
    save(root / "bird" / "nested" / "deeper" / "x.webp", Image.new("RGB", (8, 8), (1, 2, 3)))
    write_bytes(root / "bird" / "notes.txt", b"not an image and not an image name")
    write_bytes(root / "bird" / ".hidden.png", b"broken, but hidden")
    write_bytes(root / "bird" / ".cache" / "broken.png", b"broken, but in a hidden folder")
    write_bytes(root / ".trash" / "junk.png", b"a hidden class folder")
    write_bytes(root / "README.txt", b"a file next to the class folders")
    return root


MIXED_FILES = (
    "bird/anim.gif", "bird/nested/deeper/x.webp",
    "cat/deep.png", "cat/grey.png", "cat/rgb.JPG", "cat/rgba.png",
    "dog/cmyk.jpeg", "dog/la.png", "dog/palette.png",
)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_folder_loads(mixed: Path, channels: int) -> None:
    split = load(mixed, channels=channels, size=(6, 10))
    assert split.classes == ("bird", "cat", "dog")
    assert split.files == MIXED_FILES
    assert split.images.shape == (9, channels, 6, 10)
    assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
    assert split.labels.dtype == torch.int64
    assert split.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert split.skipped == ()
    assert split.root == mixed


def test_mixed_modes_decode_to_expected_colours(mixed: Path) -> None:
    rgb = load(mixed, channels=3)
    grey = load(mixed, channels=1)
    assert (pixels(rgb, "cat/grey.png") == 90).all()
    assert (pixels(rgb, "bird/anim.gif") == RED).all()  # first frame of an animation
    assert (pixels(rgb, "cat/deep.png") == 40).all()  # I;16: divided by 257
    assert (pixels(grey, "dog/la.png") == 30).all()  # fully opaque LA
    assert np.abs(pixels(rgb, "dog/cmyk.jpeg").astype(int) - RED).max() <= 3
    assert (pixels(rgb, "dog/palette.png") == 255).all()  # transparent palette index -> white
    assert (pixels(rgb, "cat/rgba.png") == (255, 127, 127)).all()  # half-transparent red over white


def test_solid_red_crops_and_stretches_to_red(tmp_path: Path) -> None:
    for fit in ("crop", "stretch"):
        out = one_image(tmp_path, Image.new("RGB", (10, 20), RED), fit=fit, size=(8, 8))
        assert out.shape == (8, 8, 3)
        assert (out == RED).all(), fit


def test_greyscale_uses_luminance(tmp_path: Path) -> None:
    out = one_image(tmp_path, Image.new("RGB", (5, 5), (200, 100, 50)), channels=1)
    assert out.shape == (8, 8, 1)
    assert (out == 124).all()  # 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 4, 8))  # left half: fully transparent black
    out = one_image(tmp_path, img, fit="stretch")
    assert (out[:, :3] == 255).all()
    assert (out[:, 5:] == (0, 0, 255)).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("L", (16, 8), 0)
    img.paste(255, (8, 0, 16, 8))  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: black on top
    save(tmp_path / "data" / "only" / "rot.png", img, exif=exif)
    out = pixels(load(tmp_path / "data", channels=1, size=(16, 8), fit="stretch"), "only/rot.png")
    assert (out[:6] == 0).all() and (out[10:] == 255).all()


def test_float_and_32bit_greyscale_are_scaled(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    save(tmp_path / "data" / "c" / "float.tif", Image.fromarray(ramp, "F"))
    save(tmp_path / "data" / "c" / "int.tif", Image.fromarray((ramp * 1000 - 500).astype(np.int32), "I"))
    split = load(tmp_path / "data", channels=1, fit="stretch")
    for rel in ("c/float.tif", "c/int.tif"):
        out = pixels(split, rel)
        assert out.min() <= 2 and out.max() >= 253, rel


def test_crop_and_stretch_differ_on_wide_image(tmp_path: Path) -> None:
    img = Image.new("L", (30, 10), 0)
    img.paste(255, (10, 0, 20, 10))  # black | white | black stripes
    save(tmp_path / "data" / "only" / "stripes.png", img)
    crop = pixels(load(tmp_path / "data", channels=1, size=(10, 10), fit="crop"), "only/stripes.png")
    stretch = pixels(load(tmp_path / "data", channels=1, size=(10, 10), fit="stretch"), "only/stripes.png")
    assert (crop > 200).all()  # the centre crop is the white stripe only
    assert (stretch[:, :2] < 50).all() and (stretch[:, 4:6] > 200).all() and (stretch[:, -2:] < 50).all()


def test_classes_argument_sets_label_order(mixed: Path) -> None:
    split = load(mixed, classes=["dog", "bird", "cat"])
    assert split.classes == ("dog", "bird", "cat")
    assert split.files[:3] == ("dog/cmyk.jpeg", "dog/la.png", "dog/palette.png")
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_worker_count_does_not_change_result(mixed: Path) -> None:
    one = load(mixed, workers=1)
    four = load(mixed, workers=4)
    assert one == four
    assert torch.equal(one.images, four.images) and one.files == four.files


# ---------------------------------------------------------------- bad image files


@pytest.fixture
def with_bad(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    solid(root, "a/good1.png")
    solid(root, "b/good2.png")
    truncated_png(root / "a" / "truncated.png")
    write_bytes(root / "b" / "text.jpg", b"this is a text file\n")
    write_bytes(root / "b" / "zero.png", b"")
    return root


@pytest.mark.parametrize("bad", ["a/truncated.png", "b/text.jpg", "b/zero.png"])
def test_bad_file_fails_with_one_line_naming_it(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "one-bad"
    solid(root, "a/good1.png")
    solid(root, "b/good2.png")
    if bad.endswith("truncated.png"):
        truncated_png(root / bad)
    else:
        write_bytes(root / bad, b"" if bad.endswith("zero.png") else b"this is a text file\n")
    with pytest.raises(DataError) as info:
        load(root)
    message = str(info.value)
    assert str(root / bad) in message
    assert "cannot decode image" in message and "--skip-bad-images" in message
    assert "\n" not in message


def test_first_bad_file_is_reported_whatever_the_workers(with_bad: Path) -> None:
    for workers in (1, 3):
        with pytest.raises(DataError, match="truncated.png"):
            load(with_bad, workers=workers)


def test_skip_leaves_bad_files_out(with_bad: Path) -> None:
    for workers in (1, 3):
        split = load(with_bad, on_error="skip", workers=workers)
        assert split.files == ("a/good1.png", "b/good2.png")
        assert split.labels.tolist() == [0, 1]
        assert split.images.shape == (2, 3, 8, 8) and split.images.is_contiguous()
        assert (split.images[:, 0] == 10).all()
        assert [rel for rel, _ in split.skipped] == ["a/truncated.png", "b/text.jpg", "b/zero.png"]
        assert all(reason.startswith("cannot decode image") for _, reason in split.skipped)


def test_all_images_bad_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "all-bad"
    write_bytes(root / "a" / "x.png", b"")
    write_bytes(root / "b" / "y.jpg", b"text")
    with pytest.raises(DataError, match="none of the 2 image files could be decoded"):
        load(root, on_error="skip")
    with pytest.raises(DataError, match="x.png"):
        load(root)


# ---------------------------------------------------------------- folder errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "file.png", b"")
    with pytest.raises(DataError, match="not a folder"):
        load(path)


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    solid(tmp_path / "empty", "loose.png")
    with pytest.raises(DataError, match="no class sub-folders; images directly in it are not used"):
        load(tmp_path / "empty")


def test_class_folder_without_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    solid(root, "cat/a.png")
    write_bytes(root / "dog" / "notes.txt", b"no images here")
    write_bytes(root / "dog" / ".hidden.png", b"hidden")
    with pytest.raises(DataError, match="class folder has no image files") as info:
        load(root)
    assert str(root / "dog") in str(info.value)


def test_no_images_at_all(tmp_path: Path) -> None:
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    with pytest.raises(DataError, match="no image files in any class folder"):
        load(tmp_path / "data")


def test_classes_mismatch_names_missing_and_extra(mixed: Path) -> None:
    with pytest.raises(DataError) as info:
        load(mixed, classes=["cat", "dog", "horse"])
    message = str(info.value)
    assert str(mixed) in message and "missing class folders: horse" in message
    assert "unexpected class folders: bird" in message and "\n" not in message
    with pytest.raises(DataError, match="duplicate"):
        load(mixed, classes=["cat", "dog", "bird", "cat"])


@pytest.mark.parametrize(
    "options",
    [{"channels": 2}, {"size": (0, 8)}, {"size": (8,)}, {"fit": "zoom"}, {"on_error": "ignore"}, {"workers": 0}],
)
def test_bad_options(mixed: Path, options: dict) -> None:
    with pytest.raises(DataError):
        load(mixed, **options)


# ---------------------------------------------------------------- cache


class DecodeCounter:
    """Wraps decode_image as the folder loader calls it, counting calls; raises when ``fail`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.real = decoding.decode_image

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise AssertionError("decode_image called although the cache should be used")
        return self.real(*args, **kwargs)


@pytest.fixture
def decode(monkeypatch: pytest.MonkeyPatch) -> DecodeCounter:
    counter = DecodeCounter()
    monkeypatch.setattr(folder, "decode_image", counter)  # as the folder loader calls it
    return counter


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.iterdir())


def test_cache_is_reused(mixed: Path, tmp_path: Path, decode: DecodeCounter) -> None:
    cache = tmp_path / "cache"
    first = load(mixed, cache_dir=cache)
    assert decode.calls == 9
    assert [p.suffix for p in cache_files(cache)] == [".safetensors"]
    decode.fail = True
    second = load(mixed, cache_dir=cache)
    assert second == first
    assert torch.equal(second.images, first.images) and second.files == first.files
    assert second.images.is_contiguous()


def test_cache_depends_on_settings(mixed: Path, tmp_path: Path, decode: DecodeCounter) -> None:
    cache = tmp_path / "cache"
    load(mixed, cache_dir=cache)
    load(mixed, cache_dir=cache, channels=1)
    load(mixed, cache_dir=cache, fit="stretch")
    load(mixed, cache_dir=cache, size=(8, 9))
    load(mixed, cache_dir=cache, classes=["dog", "cat", "bird"])
    assert decode.calls == 5 * 9
    assert len(cache_files(cache)) == 5


def test_changed_files_invalidate_cache(mixed: Path, tmp_path: Path, decode: DecodeCounter) -> None:
    cache = tmp_path / "cache"
    load(mixed, cache_dir=cache)
    stat = (mixed / "cat" / "grey.png").stat()
    os.utime(mixed / "cat" / "grey.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load(mixed, cache_dir=cache)
    assert decode.calls == 18 and len(cache_files(cache)) == 2

    solid(mixed, "cat/new.png")
    added = load(mixed, cache_dir=cache)
    assert "cat/new.png" in added.files and len(added.files) == 10

    (mixed / "cat" / "new.png").rename(mixed / "cat" / "renamed.png")
    renamed = load(mixed, cache_dir=cache)
    assert "cat/renamed.png" in renamed.files and "cat/new.png" not in renamed.files
    assert decode.calls == 18 + 10 + 10


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_corrupt_cache_is_ignored_and_rewritten(
    mixed: Path, tmp_path: Path, decode: DecodeCounter, garbage: bytes
) -> None:
    cache = tmp_path / "cache"
    first = load(mixed, cache_dir=cache)
    (path,) = cache_files(cache)
    path.write_bytes(garbage)
    assert load(mixed, cache_dir=cache) == first
    assert decode.calls == 18
    assert cache_files(cache) == [path] and path.stat().st_size > 1000  # rewritten
    decode.fail = True
    assert load(mixed, cache_dir=cache) == first


def tamper(meta: dict, tensors: dict, what: str) -> None:
    if what == "labels":
        tensors["labels"] = tensors["labels"].flip(0).contiguous()
    elif what == "files":
        meta["files"] = json.dumps([name.replace(".", "-renamed.") for name in json.loads(meta["files"])])
    elif what == "classes":
        meta["classes"] = json.dumps(["a", "b", "c"])
    elif what == "shape":
        tensors["images"] = tensors["images"][:, :, :4].contiguous()
    elif what == "version":
        meta["version"] = "999"


@pytest.mark.parametrize("what", ["labels", "files", "classes", "shape", "version"])
def test_inconsistent_cache_is_not_trusted(mixed: Path, tmp_path: Path, decode: DecodeCounter, what: str) -> None:
    cache = tmp_path / "cache"
    first = load(mixed, cache_dir=cache)
    (path,) = cache_files(cache)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tamper(meta, tensors, what)
    save_file(tensors, str(path), metadata=meta)  # a valid safetensors file that does not match the folder
    assert load(mixed, cache_dir=cache) == first
    assert decode.calls == 18


def test_unwritable_cache_is_not_fatal(mixed: Path, tmp_path: Path) -> None:
    blocker = write_bytes(tmp_path / "blocker", b"a file where the cache folder should go")
    split = load(mixed, cache_dir=blocker / "cache")
    assert split.files == MIXED_FILES


def test_cached_skips_still_fail_without_skip(with_bad: Path, tmp_path: Path, decode: DecodeCounter) -> None:
    cache = tmp_path / "cache"
    skipped = load(with_bad, cache_dir=cache, on_error="skip")
    decode.fail = True
    assert load(with_bad, cache_dir=cache, on_error="skip") == skipped
    with pytest.raises(DataError, match="truncated.png: cannot decode image") as info:
        load(with_bad, cache_dir=cache)
    assert "--skip-bad-images" in str(info.value)
    assert not [p for p in cache.iterdir() if p.suffix == ".part"]


# ---------------------------------------------------------------- split_folder


def synthetic_split(counts: list[int]) -> FolderSplit:
    """A split whose image i is filled with the value i, so images and files can be matched up."""
    labels = torch.tensor([label for label, n in enumerate(counts) for _ in range(n)], dtype=torch.int64)
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    files = tuple(f"c{int(label)}/{i:03d}.png" for i, label in enumerate(labels))
    return FolderSplit(images, labels, tuple(f"c{i}" for i in range(len(counts))), files, (("c0/bad.png", "r"),),
                       Path("/data"))


def test_split_sizes_per_class() -> None:
    whole = synthetic_split([10, 5, 1, 2, 3])
    train, test = split_folder(whole, 0.2, seed=0)
    assert torch.bincount(test.labels, minlength=5).tolist() == [2, 1, 0, 1, 1]
    assert torch.bincount(train.labels, minlength=5).tolist() == [8, 4, 1, 1, 2]
    for part in (train, test):
        assert part.classes == whole.classes and part.root == whole.root and part.skipped == whole.skipped
        assert part.images.is_contiguous() and part.images.dtype == torch.uint8
        assert [f"c{int(label)}/{int(v):03d}.png" for label, v in zip(part.labels, part.images[:, 0, 0, 0])] == list(
            part.files
        )
    assert set(train.files).isdisjoint(test.files)
    assert sorted(train.files + test.files) == sorted(whole.files)
    assert list(train.files) == sorted(train.files) and list(test.files) == sorted(test.files)


def test_split_is_deterministic_per_seed() -> None:
    whole = synthetic_split([20, 20])
    assert split_folder(whole, 0.25, seed=3) == split_folder(whole, 0.25, seed=3)
    test_sets = {split_folder(whole, 0.25, seed=seed)[1].files for seed in range(5)}
    assert len(test_sets) > 1


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(DataError, match="test fraction"):
        split_folder(synthetic_split([4, 4]), fraction, seed=0)


def test_split_needs_a_class_with_two_images() -> None:
    with pytest.raises(DataError, match="no class has 2 or more images"):
        split_folder(synthetic_split([1, 1]), 0.5, seed=0)
