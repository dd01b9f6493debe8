"""Tests for nin.data.loader: epoch coverage, deterministic order, exact resume, sharding, augmentation, transform."""

from __future__ import annotations

import pytest
import torch

from nin.data.loader import Augment, DeviceLoader, channel_stats, translate
from nin.errors import NinError

N = 103  # prime: no batch size divides it


pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(n: int = N, channels: int = 1, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images; the label of image i is i, so every batch says which images it holds."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n)


IMAGES, LABELS = make_images()


def loader(batch_size: int = 10, **kw) -> DeviceLoader:
    return DeviceLoader(IMAGES, LABELS, batch_size, **kw)


def order(dl: DeviceLoader) -> list[int]:
    return torch.cat([y for _, y in dl]).tolist()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the default normalization (mean 0, std 1): x = v / 255."""
    return (x * 255).round().to(torch.uint8)


# ------------------------------------------------------------------- coverage


def test_one_shuffled_epoch_covers_every_example_once():
    dl = loader(10, shuffle=True, seed=3)
    batches = list(dl)
    sizes = [len(y) for _, y in batches]
    assert len(dl) == len(batches) == 11
    assert sizes == [10] * 10 + [3]
    assert sum(sizes) == N
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(N))
    for x, y in batches:
        assert x.shape == (len(y), 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dl.num_examples == N


def test_drop_last_drops_the_short_batch():
    dl = loader(10, shuffle=True, seed=3, drop_last=True)
    batches = list(dl)
    assert len(dl) == len(batches) == 10
    assert [len(y) for _, y in batches] == [10] * 10
    seen = torch.cat([y for _, y in batches]).tolist()
    assert len(set(seen)) == 100
    assert dl.num_examples == 100


def test_x_is_the_image_named_by_y_without_augmentation():
    for x, y in loader(16, shuffle=True):
        assert torch.equal(to_uint8(x), IMAGES[y])


# ---------------------------------------------------------------------- order


def test_order_is_a_function_of_seed_and_epoch():
    a, b = loader(10, shuffle=True, seed=5), loader(10, shuffle=True, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    first = order(a)
    assert first == order(b)
    assert first == order(a)  # iterating again repeats the epoch
    assert first != list(range(N))

    b.set_epoch(3)
    assert order(b) != first

    c = loader(10, shuffle=True, seed=6)
    c.set_epoch(2)
    assert order(c) != first


def test_no_shuffle_is_natural_order():
    dl = loader(10, shuffle=False, seed=5)
    dl.set_epoch(4)
    assert order(dl) == list(range(N))


# --------------------------------------------------------------------- resume


@pytest.mark.parametrize("start", [0, 1, 6, 10, 11])
def test_iterate_from_start_is_the_tail_of_a_full_epoch(start):
    dl = loader(10, shuffle=True, seed=7, augment=Augment(crop_padding=2, flip=True))
    dl.set_epoch(3)
    full = list(dl.iterate())
    # a fresh loader, as after a restart
    resumed = loader(10, shuffle=True, seed=7, augment=Augment(crop_padding=2, flip=True))
    resumed.set_epoch(3)
    tail = list(resumed.iterate(start=start))
    assert len(tail) == len(full) - start
    for (xa, ya), (xb, yb) in zip(full[start:], tail, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)
    # augmentation really is on: some image differs from its original
    xs, ys = torch.cat([x for x, _ in full]), torch.cat([y for _, y in full])
    assert not torch.equal(to_uint8(xs), IMAGES[ys])


# ------------------------------------------------------------------- sharding


@pytest.mark.parametrize("augment", [Augment(), Augment(crop_padding=2, flip=True)], ids=["plain", "augmented"])
@pytest.mark.parametrize("b", [4, 10])
def test_two_ranks_split_the_single_process_batches(augment, b):
    kw = {"shuffle": True, "seed": 11, "augment": augment}
    single = loader(2 * b, **kw)
    ranks = [loader(b, rank=r, world_size=2, **kw) for r in (0, 1)]
    for dl in (single, *ranks):
        dl.set_epoch(1)
    assert len(ranks[0]) == len(ranks[1]) == len(single)

    big = list(single)
    parts = [list(dl) for dl in ranks]
    assert len(parts[0]) == len(parts[1]) == len(big)
    first_x, first_y = big[0][0][:1], big[0][1][:1]
    for (x, y), (x0, y0), (x1, y1) in zip(big, *parts, strict=True):
        assert len(y0) == len(y1) <= b
        pad = len(y0) + len(y1) - len(y)  # a short last batch is padded to an even split
        assert pad in (0, 1)
        assert torch.equal(torch.cat([y0, y1]), torch.cat([y, first_y[:pad]]))
        assert torch.equal(torch.cat([x0, x1]), torch.cat([x, first_x[:pad]]))

    seen = [torch.cat([y for _, y in p]).tolist() for p in parts]
    padded = ranks[0].num_examples + ranks[1].num_examples - N
    assert padded == -(N % (2 * b)) % 2
    assert len(set(seen[0]) & set(seen[1])) == padded
    assert set(seen[0]) | set(seen[1]) == set(range(N))


def test_every_rank_yields_len_loader_batches_when_the_last_global_batch_is_tiny():
    # 103 = 17 * 6 + 1: with world_size 2 and batch 3 the last global batch holds one example.
    ranks = [loader(3, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    batches = [list(dl) for dl in ranks]
    assert [len(b) for b in batches] == [len(ranks[0]), len(ranks[1])] == [18, 18]
    assert [len(b[-1][1]) for b in batches] == [1, 1]  # padded with the epoch's first example
    first = batches[0][0][1][0]
    assert batches[1][-1][1].tolist() == [int(first)]


def test_rank_must_be_below_world_size():
    with pytest.raises(ValueError):
        loader(4, rank=2, world_size=2)


# ------------------------------------------------------------------ translate


def reference_translate(x: torch.Tensor, shifts: torch.Tensor, p: int) -> torch.Tensor:
    """Pad every image by p with zeros and crop it at (p - dy, p - dx), one image at a time."""
    out = torch.empty_like(x)
    h, w = x.shape[2:]
    for i in range(len(x)):
        padded = torch.zeros(x.shape[1], h + 2 * p, w + 2 * p, dtype=x.dtype)
        padded[:, p : p + h, p : p + w] = x[i]
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = padded[:, p - dy : p - dy + h, p - dx : p - dx + w]
    return out


@pytest.mark.parametrize("p", [1, 3])
def test_translate_matches_pad_and_crop(p):
    x, _ = make_images(8, channels=2, size=7, seed=1)
    x = x[:, :, :, :6]  # a non-square image catches swapped axes
    g = torch.Generator().manual_seed(p)
    shifts = torch.randint(-p, p + 1, (8, 2), generator=g)
    shifts[0] = torch.tensor([0, 0])
    shifts[1] = torch.tensor([p, -p])
    shifts[2] = torch.tensor([-p, p])
    shifts[3] = torch.tensor([p, 0])
    assert torch.equal(translate(x, shifts), reference_translate(x, shifts, p))
    # the padding used does not matter: a bigger pad gives the same crop
    assert torch.equal(reference_translate(x, shifts, p + 2), reference_translate(x, shifts, p))
    # an unshifted image is untouched, a shifted one is not
    out = translate(x, shifts)
    assert torch.equal(out[0], x[0])
    assert not torch.equal(out[1], x[1])


def test_translate_moves_content_down_and_right_for_positive_shifts():
    x = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    x[0, 0, 1, 1] = 9
    out = translate(x, torch.tensor([[2, 1]]))
    assert out[0, 0, 3, 2] == 9 and int(out.sum()) == 9


def test_translate_with_zero_shifts_returns_the_input():
    x, _ = make_images(5, seed=2)
    assert torch.equal(translate(x, torch.zeros(5, 2, dtype=torch.long)), x)


# ----------------------------------------------------------------------- flip


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    dl = loader(16, shuffle=True, seed=1, augment=Augment(crop_padding=0, flip=True))
    same = mirrored = 0
    for x, y in dl:
        got, orig = to_uint8(x), IMAGES[y]
        for g, o in zip(got, orig):
            is_same, is_mirror = torch.equal(g, o), torch.equal(g, o.flip(-1))
            assert is_same or is_mirror
            same += is_same
            mirrored += is_mirror
    assert same + mirrored == N  # random images are never their own mirror
    assert same > 0 and mirrored > 0


def test_crop_padding_shifts_images_within_the_padding():
    p = 2
    offsets = torch.tensor([(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)])
    dl = loader(16, shuffle=True, seed=2, augment=Augment(crop_padding=p))
    shifted = 0
    for x, y in dl:
        for g, i in zip(to_uint8(x), y.tolist()):
            # every translation of the original by at most p, as one batch
            candidates = translate(IMAGES[i : i + 1].expand(len(offsets), -1, -1, -1), offsets)
            hits = [tuple(o) for o, c in zip(offsets.tolist(), candidates) if torch.equal(g, c)]
            assert hits, f"image {i} is not a translation of its original by at most {p}"
            shifted += hits != [(0, 0)]
    assert shifted > N // 2


# ------------------------------------------------------------------ transform


def test_transform_normalizes_with_mean_and_std():
    dl = loader(4, mean=(0.5,), std=(0.25,))
    v = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    out = dl.transform(v.clone())
    assert out.dtype == torch.float32 and out.shape == (4, 1, 8, 8)
    expected = (v.double() / 255.0 - 0.5) / 0.25
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.0)
    assert out[3, 0, 7, 7].item() == pytest.approx(2.0)


def test_transform_resizes_to_size():
    dl = loader(4, size=(224, 224), mean=(0.5,), std=(0.5,))
    x = torch.full((3, 1, 8, 8), 51, dtype=torch.uint8)
    out = dl.transform(x)
    assert out.shape == (3, 1, 224, 224) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (0.2 - 0.5) / 0.5), atol=1e-6)
    xb, _ = next(iter(dl))
    assert xb.shape == (4, 1, 224, 224)


def test_transform_applies_per_channel_stats_and_channels_last():
    images, labels = make_images(6, channels=3, size=5, seed=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    dl = DeviceLoader(images, labels, 6, mean=mean, std=std, channels_last=True)
    out = dl.transform(images.clone())
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        expected = (images[:, c].double() / 255.0 - mean[c]) / std[c]
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5)
    x, _ = next(iter(dl))
    assert x.is_contiguous(memory_format=torch.channels_last)

    plain = DeviceLoader(images, labels, 6, mean=mean, std=std).transform(images.clone())
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, out)


def test_mismatched_normalization_length_raises():
    images, labels = make_images(4, channels=3)
    with pytest.raises(ValueError):
        DeviceLoader(images, labels, 2, mean=(0.1, 0.2), std=(1.0,))


# -------------------------------------------------------------- channel_stats


def test_channel_stats_on_a_known_tensor():
    images = torch.zeros(4, 3, 50, 50, dtype=torch.uint8)  # 10,000 values per channel
    images[:2, 0] = 255  # channel 0: half 0, half 255 -> mean 0.5, std 0.5
    images[:, 1] = 51  # channel 1: constant 0.2 -> std 0
    images[:, 2, :, :25] = 102  # channel 2: half 0.4, half 0.0 -> mean 0.2, std 0.2
    mean, std = channel_stats(images)
    assert len(mean) == len(std) == 3
    assert mean == pytest.approx((0.5, 0.2, 0.2), abs=1e-9)
    # population and sample std differ by a factor sqrt(10000/9999) here: accept either convention
    assert std == pytest.approx((0.5, 0.0, 0.2), rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------ bad input


def test_non_uint8_images_raise_value_error():
    with pytest.raises(ValueError):
        DeviceLoader(IMAGES.float(), LABELS, 4)
    with pytest.raises(ValueError):
        DeviceLoader(IMAGES[:, 0], LABELS, 4)  # [N, H, W]: no channel axis


def test_mismatched_label_count_raises_value_error():
    with pytest.raises(ValueError):
        DeviceLoader(IMAGES, LABELS[:-1], 4)


def test_batch_size_zero_raises_nin_error():
    with pytest.raises(NinError):
        DeviceLoader(IMAGES, LABELS, 0)
