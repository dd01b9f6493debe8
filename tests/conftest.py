"""Shared fixtures: real Fashion-MNIST when it is installed, small synthetic data otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from nin.data import DataError, find_files


@pytest.fixture(scope="module")
def one_thread():
    """Run small CPU tests on one thread (much faster on a shared, busy machine); restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_mnist() -> None:
    """Skip unless real Fashion-MNIST is on this machine; in CI its absence is a failure."""
    try:
        find_files("fashion-mnist", download=False)
    except DataError as e:
        if os.environ.get("CI"):
            pytest.fail(f"real Fashion-MNIST is required in CI: {e}")
        pytest.skip(f"real Fashion-MNIST not installed: {e}")


def synthetic_images(n: int, classes: int = 4, size: int = 12, channels: int = 1, seed: int = 0):
    """uint8 noise images whose class sets the brightness of a central square."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randint(0, 40, (n, channels, size, size), generator=g)
    c = slice(size // 4, size - size // 4)
    x[:, :, c, c] += (labels * (200 // max(classes - 1, 1))).view(n, 1, 1, 1)
    return x.clamp(0, 255).to(torch.uint8), labels
