"""Learning, for real: the default model on real Fashion-MNIST images."""

from __future__ import annotations

import pytest

from nin.training.config import preset
from nin.training.run import train


@pytest.mark.slow
def test_nin28_learns_fashion_mnist_from_5000_images(tmp_path, fashion_mnist):
    cfg = preset("default")
    cfg.data.subset = 5000  # a seeded random 5,000 of the 60,000 training images
    cfg.train.epochs = 1
    cfg.train.batch_size = 64
    result = train(cfg, tmp_path / "run", progress=False)
    (epoch,) = result.history
    assert epoch["train_acc"] > 0.6
    assert result.trainer.test_loader.num_examples == 10_000  # the whole real test set
    assert epoch["test_acc"] > 0.75, epoch


@pytest.mark.slow
def test_fast_paths_cost_no_accuracy(tmp_path, fashion_mnist):
    """bf16/channels_last (native or emulated, whatever this CPU is) learns as well as fp32/NCHW on the same data.

    Both runs are pinned, so this compares the two precisions on every machine. One epoch of 3,000 images is
    the steep part of the learning curve, where another rounding moves the final accuracy by a point or so
    either way; a broken reduced-precision path (a lost gradient, a wrong cast) costs far more than 2 points.
    Both are scored on the same 4,000 real test images (emulated bf16 is slow: the whole test set would double
    the test's time on a CPU without native bf16).
    """

    def run(name: str, amp: str, channels_last: bool) -> float:
        cfg = preset("default")
        cfg.data.subset, cfg.data.test_subset = 3000, 4000
        cfg.train.epochs, cfg.train.batch_size = 1, 64
        cfg.train.amp, cfg.train.channels_last = amp, channels_last
        result = train(cfg, tmp_path / name, progress=False)
        assert result.trainer.config.amp == amp and result.trainer.config.channels_last == channels_last
        assert result.trainer.test_loader.num_examples == 4000
        return result.history[-1]["test_acc"]

    fp32 = run("fp32", "none", False)
    fast = run("bf16", "bf16", True)
    assert fp32 > 0.7, fp32
    assert fast >= fp32 - 0.02, (fp32, fast)


@pytest.mark.slow
def test_the_stronger_recipes_techniques_learn_real_images(tmp_path, fashion_mnist):
    """Random erasing, random crops and an EMA of the weights, on a wider NiN: the evaluated (averaged) model
    learns from 5,000 real images in two epochs, as the plain recipe does in one."""
    cfg = preset("default")
    cfg.model.name = "nin28_s"
    cfg.data.subset, cfg.data.erase, cfg.data.crop_padding = 5000, 0.5, 2
    cfg.train.epochs, cfg.train.batch_size, cfg.train.ema = 2, 64, 0.99
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.history[-1]["test_acc"] > 0.78, result.history  # on all 10,000 test images
