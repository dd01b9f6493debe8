"""Batches from a split held on the training device as one uint8 tensor.

Nothing happens per image in Python: each batch is an index slice of the
resident tensor; augmentation (random translation by crop-with-padding and
horizontal flips), conversion to float, normalization and resizing are done on
the whole batch on the device.

Order is a pure function of ``(seed, epoch)``: the permutation and every
augmentation draw for an epoch are made up front, so a run resumed at any step
sees exactly the batches an uninterrupted run would. With several processes
each global batch is cut into ``world_size`` contiguous per-process slices, so
``world_size`` processes of batch ``b`` see the same examples per step as one
process of batch ``world_size * b`` (a short last batch is padded with the
epoch's first examples to a multiple of ``world_size``, so every process takes
the same number of steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nin.errors import NinError


@dataclass(frozen=True)
class Augment:
    """Random translation by up to ``crop_padding`` pixels and random horizontal flips."""

    crop_padding: int = 0
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` on the 0-1 scale."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


class DeviceLoader:
    """Iterate ``(x, y)`` batches of a resident uint8 split.

    ``x`` is float32 ``[B, C, *size]``, normalized with ``mean``/``std`` (0-1
    scale), or passed through ``whiten`` instead (e.g. :class:`nin.data.whiten.Whitening`);
    ``y`` is int64 ``[B]``. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        size: tuple[int, int] | None = None,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        augment: Augment = Augment(),
        whiten: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if batch_size < 1:
            raise NinError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.images, self.labels = images, labels
        self.device = images.device
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.size = tuple(size) if size is not None else tuple(images.shape[2:])
        c = images.shape[1]
        self.mean = torch.tensor(_per_channel(mean, c), device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(_per_channel(std, c), device=self.device).view(1, c, 1, 1)
        self.augment = augment
        self.whiten = whiten
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    # ---------------------------------------------------------------- sizing
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    @property
    def num_examples(self) -> int:
        """Examples this process sees per epoch."""
        return sum(len(idx) for idx in self._batches(self._order()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ----------------------------------------------------------------- order
    def _generator(self, stream: int) -> torch.Generator:
        # CPU generators keyed by (seed, epoch, stream): the same draws on every device and process.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 8 + stream)

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=self._generator(0))

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(len(self)):
            g = order[i * self.global_batch : (i + 1) * self.global_batch]
            short = -len(g) % self.world_size
            if short:  # a short last batch: repeat the epoch's first examples so every rank gets as many
                g = torch.cat([g, order[:short]])
            per = len(g) // self.world_size
            out.append(g[self.rank * per : (self.rank + 1) * per])
        return out

    # -------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this epoch's batches from batch index ``start`` on."""
        # The epoch's order and augmentation draws go to the device once; each batch is then
        # pure device work with no host round trip.
        batches = self._batches(self._order().to(self.device))
        shifts = flips = None
        if self.augment.enabled:
            g = self._generator(1)
            n, p = len(self.images), self.augment.crop_padding
            shifts = torch.randint(-p, p + 1, (n, 2), generator=g).to(self.device) if p else None
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device) if self.augment.flip else None
        for idx in batches[start:]:
            x = self.images[idx]
            if shifts is not None:
                x = translate(x, shifts[idx], self.augment.crop_padding)
            if flips is not None:
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            yield self.transform(x), self.labels[idx]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> normalized (or whitened) float32 at the output size."""
        x = x.float().div_(255.0)
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        x = self.whiten(x) if self.whiten is not None else x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def translate(x: torch.Tensor, shifts: torch.Tensor, max_shift: int | None = None) -> torch.Tensor:
    """Shift each image of ``x`` by ``shifts[i] = (dy, dx)`` pixels, filling with zeros.

    The same as padding by ``max_shift`` (default: the largest shift, which costs
    a host sync on a GPU) and taking a random crop, done for the whole batch with
    one gather.
    """
    b, c, h, w = x.shape
    p = max_shift if max_shift is not None else (int(shifts.abs().max()) if len(shifts) else 0)
    if p == 0:
        return x
    padded = F.pad(x, (p, p, p, p))
    rows = torch.arange(h, device=x.device).view(1, h) + (p - shifts[:, :1])  # [B, H]
    cols = torch.arange(w, device=x.device).view(1, w) + (p - shifts[:, 1:])  # [B, W]
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    values = list(values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} normalization values for {channels} channels")
    return values
