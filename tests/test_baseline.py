"""Tests for nin.analysis.seed_way: the seed's network, per-image PIL data path and step-by-step training/inference."""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nin.analysis.seed_way import ResizedImages, SeedWay, seed_loader, seed_net

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 96  # the smallest convenient input the 224-pixel NiN still reduces to 1x1 without error
BATCH = 4


def make_images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels in 0..9."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def seed_way(n_train: int = 2 * BATCH, n_test: int = 2 * BATCH, **kw) -> SeedWay:
    """A SeedWay over tiny random data; by default two batches per split and no worker processes."""
    train = make_images(n_train, seed=1)
    test = make_images(n_test, seed=2)
    kw = {"batch_size": BATCH, "size": SIZE, "workers": 0, **kw}
    return SeedWay(*train, *test, **kw)


# seed_net


def test_seed_net_parameters_and_shape():
    net = seed_net()
    assert sum(p.numel() for p in net.parameters()) == 1_992_166
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 1, 224, 224))
    assert out.shape == (2, 10)


def test_seed_net_overrides():
    net = seed_net(num_classes=7, in_channels=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 3
    assert convs[-1].out_channels == 7
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 7)


def test_seed_net_is_plain_layers():
    plain = (nn.Sequential, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.AdaptiveAvgPool2d, nn.Flatten)
    modules = list(seed_net().modules())
    assert all(type(m) in plain for m in modules)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == 12
    assert [m.out_channels for m in modules if isinstance(m, nn.Conv2d)][::3] == [96, 256, 384, 10]


# ResizedImages


def test_resized_images_item():
    images, labels = make_images(5)
    data = ResizedImages(images, labels, size=SIZE)
    assert len(data) == 5
    x, y = data[3]
    assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int) and y == int(labels[3])
    pil = Image.fromarray(images[3, 0].numpy())
    assert pil.mode == "L"
    pil = pil.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.array(pil)).float() / 255
    torch.testing.assert_close(x[0], expected, rtol=0, atol=0)


def test_resized_images_rejects_bad_input():
    images, labels = make_images(3, channels=3)
    with pytest.raises(ValueError, match="single-channel"):
        ResizedImages(images, labels)
    images, labels = make_images(3)
    with pytest.raises(ValueError, match="uint8"):
        ResizedImages(images.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        ResizedImages(images, labels[:2])


# seed_loader


def test_seed_loader_batches_and_order():
    images = make_images(10)[0]
    labels = torch.arange(10)  # label i marks image i, so the labels give the order

    def order(seed: int) -> list[int]:
        batches = list(seed_loader(images, labels, batch_size=4, size=SIZE, workers=0, seed=seed))
        x, _ = batches[0]
        assert x.shape == (4, 1, SIZE, SIZE) and x.dtype == torch.float32
        assert [len(b[1]) for b in batches] == [4, 4, 2]
        return torch.cat([b[1] for b in batches]).tolist()

    first = order(0)
    assert sorted(first) == list(range(10))
    assert order(0) == first
    assert order(1) != first


def test_seed_loader_without_shuffle_keeps_order():
    images, _ = make_images(6)
    loader = seed_loader(images, torch.arange(6), batch_size=4, size=SIZE, shuffle=False, workers=0)
    assert torch.cat([y for _, y in loader]).tolist() == list(range(6))


# SeedWay


def test_train_steps_across_epoch_boundary():
    way = seed_way()
    before = [p.detach().clone() for p in way.net.parameters()]
    assert way.train_steps(3) == 3 * BATCH  # two batches per epoch: the third step starts a second epoch
    assert way.train_steps(1) == BATCH
    assert way.train_seen == 4 * BATCH
    assert math.isfinite(way.train_loss_sum) and way.train_loss_sum > 0
    assert 0 <= way.train_correct <= way.train_seen
    assert float(way.train_correct).is_integer()
    assert any(not torch.equal(a, b) for a, b in zip(before, way.net.parameters()))
    assert way.net.training
    way.close()


def test_train_steps_short_last_batch():
    way = seed_way(n_train=BATCH + 1)
    assert way.train_steps(2) == BATCH + 1
    assert way.train_steps(1) == BATCH
    assert way.train_seen == 2 * BATCH + 1


def test_same_seed_same_training():
    losses = []
    for _ in range(2):
        way = seed_way(seed=3)
        way.train_steps(2)
        losses.append(way.train_loss_sum)
    assert losses[0] == losses[1]


def test_infer_batches_and_predict_one():
    way = seed_way(n_test=BATCH + 2)
    assert way.infer_batches(1) == BATCH
    assert way.infer_batches(2) == 2 + BATCH  # the short last batch, then a fresh pass
    assert way.test_seen == 2 * BATCH + 2
    assert 0 <= way.test_correct <= way.test_seen
    assert way.net.training
    image = make_images(1, size=20, seed=4)[0][0]
    cls = way.predict_one(image)
    assert isinstance(cls, int) and 0 <= cls < 10
    assert way.net.training
    assert way.predict_one(image) == cls  # eval mode: dropout is off
    with pytest.raises(ValueError):
        way.predict_one(image.float())


def test_close_and_context_manager():
    way = seed_way()
    way.train_steps(1)
    way.infer_batches(1)
    way.close()
    assert way._train_iter is None and way._test_iter is None
    way.close()  # idempotent
    with seed_way() as w:
        assert w.train_steps(1) == BATCH
    assert w._train_iter is None


def test_worker_processes():
    before = len(multiprocessing.active_children())
    with seed_way(workers=2) as way:
        assert way.train_steps(1) == BATCH
        assert way.infer_batches(1) == BATCH
        assert len(multiprocessing.active_children()) > before
    assert len(multiprocessing.active_children()) == before
