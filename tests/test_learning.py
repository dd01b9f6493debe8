"""Learning, for real: the default model on real Fashion-MNIST images."""

from __future__ import annotations

from nin.run import preset, train


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
