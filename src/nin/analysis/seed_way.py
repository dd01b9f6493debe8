"""The seed's way of training NiN, kept only as a yardstick for ``nin bench --baseline``.

This module re-implements the recipe of the "Dive into Deep Learning" NiN
chapter that this project started from, so that a benchmark can time it in the
same process and on the same uint8 data as the fast path (:mod:`nin.data.loader`,
:mod:`nin.training.trainer`). Nothing else in the package uses it, and it is deliberately
*not* optimized; it exists only to be measured against. Its defining traits:

* fp32 throughout, default (NCHW) memory format;
* every image is turned into a PIL image, resized on its own to ``size x size``
  with bilinear filtering and converted to a float tensor in ``[0, 1]`` (what a
  ``Resize`` + ``ToTensor`` transform pipeline does), inside a
  :class:`torch.utils.data.DataLoader` with worker processes;
* a plain :class:`torch.nn.Sequential` network with Xavier-uniform weights;
* plain SGD (no momentum, no weight decay) on cross-entropy;
* per-batch metrics accumulated on the host: loss times batch size, number
  correct and count are each turned into a Python float every batch, which
  synchronizes with the device once per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["ResizedImages", "SeedWay", "seed_loader", "seed_net"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _mlpconv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """One NiN block: a spatial convolution then two 1x1 convolutions, each followed by ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


def _init_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights for convolutions and linear layers; biases keep PyTorch's default."""
    if type(module) in (nn.Conv2d, nn.Linear):
        nn.init.xavier_uniform_(module.weight)


def seed_net(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """The seed's NiN for 224x224 inputs, as a plain :class:`~torch.nn.Sequential`.

    Four mlpconv blocks of 96 (11x11, stride 4), 256 (5x5, pad 2), 384 (3x3,
    pad 1) and ``num_classes`` (3x3, pad 1) channels; 3x3 stride-2 max pooling
    after the first three; dropout 0.5 before the last; global average pooling
    and flatten. 1,992,166 parameters with the defaults.
    """
    net = nn.Sequential(
        _mlpconv(in_channels, 96, kernel_size=11, stride=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        _mlpconv(96, 256, kernel_size=5, stride=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        _mlpconv(256, 384, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        _mlpconv(384, num_classes, kernel_size=3, stride=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
    )
    net.apply(_init_xavier)
    return net


def _resize_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """One ``[H, W]`` uint8 array -> PIL bilinear resize -> float32 ``[1, size, size]`` in ``[0, 1]``."""
    pil = Image.fromarray(image)  # a 2-D uint8 array becomes a mode "L" image
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).unsqueeze(0).float().div(255)


class ResizedImages(Dataset):
    """Single-channel uint8 images served one at a time, each resized with PIL, as the seed's dataset did.

    ``images`` is uint8 ``[N, 1, H, W]`` and ``labels`` is ``[N]``. Both are kept
    as numpy arrays so that forked DataLoader workers share them cheaply.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int = 224) -> None:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected single-channel images [N, 1, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.images = images.detach().cpu().numpy()
        self.labels = labels.detach().cpu().to(torch.int64).numpy()
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _resize_to_tensor(self.images[i, 0], self.size), int(self.labels[i])


def seed_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    size: int = 224,
    shuffle: bool = True,
    workers: int = 4,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over :class:`ResizedImages`; its order (and worker seeds) follow ``seed``."""
    return DataLoader(
        ResizedImages(images, labels, size),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )


class SeedWay:
    """The seed's way of training and inference, driven step by step so a benchmark can time it.

    Training and test batches come from one live iterator each, continued across
    calls; when an iterator runs out a new one (a new epoch, with fresh worker
    processes, as the seed had) is started. Host-side sums are kept in
    ``train_loss_sum`` (loss times batch size), ``train_correct``,
    ``train_seen``, ``test_correct`` and ``test_seen``.
    """

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        *,
        batch_size: int = 128,
        size: int = 224,
        workers: int = 4,
        lr: float = 0.1,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.size = size
        torch.manual_seed(seed)
        self.net = seed_net(in_channels=train_images.shape[1]).to(self.device)
        self.net.train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.loss = nn.CrossEntropyLoss()
        self.train_loader = seed_loader(train_images, train_labels, batch_size, size, True, workers, seed)
        self.test_loader = seed_loader(test_images, test_labels, batch_size, size, False, workers, seed)
        self._train_iter: Iterator[Batch] | None = None
        self._test_iter: Iterator[Batch] | None = None
        self.train_loss_sum = 0.0
        self.train_correct = 0.0
        self.train_seen = 0.0
        self.test_correct = 0.0
        self.test_seen = 0.0

    def _next_train(self) -> Batch:
        if self._train_iter is not None:
            batch = next(self._train_iter, None)
            if batch is not None:
                return batch
        self._train_iter = None  # drop the finished iterator (and its workers) before starting the next
        self._train_iter = iter(self.train_loader)
        return next(self._train_iter)

    def _next_test(self) -> Batch:
        if self._test_iter is not None:
            batch = next(self._test_iter, None)
            if batch is not None:
                return batch
        self._test_iter = None
        self._test_iter = iter(self.test_loader)
        return next(self._test_iter)

    @staticmethod
    def _correct(logits: torch.Tensor, y: torch.Tensor) -> float:
        """Number of correct predictions as a Python float (a host sync, as the seed's accuracy helper)."""
        return float((logits.argmax(dim=1).type(y.dtype) == y).type(y.dtype).sum())

    def train_steps(self, n: int) -> int:
        """Run ``n`` SGD steps in train mode; return the number of examples processed."""
        self.net.train()
        seen = 0
        for _ in range(n):
            X, y = self._next_train()
            self.optimizer.zero_grad()
            X, y = X.to(self.device), y.to(self.device)
            y_hat = self.net(X)
            loss = self.loss(y_hat, y)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                self.train_loss_sum += float(loss * X.shape[0])
                self.train_correct += self._correct(y_hat, y)
                self.train_seen += float(X.shape[0])
            seen += X.shape[0]
        return seen

    def infer_batches(self, n: int) -> int:
        """Classify ``n`` test batches in eval mode without gradients; return the number of examples."""
        self.net.eval()
        seen = 0
        try:
            with torch.no_grad():
                for _ in range(n):
                    X, y = self._next_test()
                    X, y = X.to(self.device), y.to(self.device)
                    self.test_correct += self._correct(self.net(X), y)
                    self.test_seen += float(y.numel())
                    seen += y.numel()
        finally:
            self.net.train()
        return seen

    def predict_one(self, image: torch.Tensor) -> int:
        """Class index for one uint8 ``[1, H, W]`` image, going through the same PIL resize (batch of one)."""
        if image.dim() != 3 or image.shape[0] != 1 or image.dtype != torch.uint8:
            raise ValueError(f"expected one uint8 image [1, H, W], got {image.dtype} {tuple(image.shape)}")
        X = _resize_to_tensor(image[0].detach().cpu().numpy(), self.size).unsqueeze(0)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return int(self.net(X.to(self.device)).argmax(dim=1).item())
        finally:
            self.net.train(was_training)

    def close(self) -> None:
        """Drop the live iterators so their worker processes exit."""
        self._train_iter = None
        self._test_iter = None

    def __enter__(self) -> SeedWay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
