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


def test_fast_paths_cost_no_accuracy(tmp_path, fashion_mnist):
    """fp32/NCHW and bf16/channels_last runs on the same data end within one point of test accuracy."""

    def run(name: str, amp: str, channels_last: bool) -> float:
        cfg = preset("default")
        cfg.data.subset, cfg.data.test_subset = 3000, 2000
        cfg.train.epochs, cfg.train.batch_size = 1, 64
        cfg.train.amp, cfg.train.channels_last = amp, channels_last
        result = train(cfg, tmp_path / name, progress=False)
        assert result.trainer.config.amp == amp and result.trainer.config.channels_last == channels_last
        return result.history[-1]["test_acc"]

    fp32 = run("fp32", "none", False)
    fast = run("bf16", "bf16", True)
    assert fp32 > 0.7, fp32
    assert abs(fast - fp32) <= 0.01, (fp32, fast)
