"""Batches from a split held on the training device as one uint8 tensor.

Nothing happens per image in Python: each batch is an index slice of the
resident tensor; augmentation (random translation by crop-with-padding,
horizontal flips and random erasing), conversion to float, normalization and
resizing are done on the whole batch on the device.

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

#: Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020, arXiv:1708.04896): the
#: erased rectangle covers a uniform share of the image in this range, with a log-uniform aspect ratio
#: (height over width) in ``ERASE_RATIO`` (the paper's s_l, s_h and r_1).
ERASE_AREA = (0.02, 0.4)
ERASE_RATIO = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class Augment:
    """Random translation by up to ``crop_padding`` pixels, random horizontal flips, and random erasing: with
    probability ``erase``, one rectangle of the image (see :data:`ERASE_AREA`) filled with one random value
    per channel."""

    crop_padding: int = 0
    flip: bool = False
    erase: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.erase > 0


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
        shifts = flips = boxes = None
        if self.augment.enabled:
            g = self._generator(1)
            n, p = len(self.images), self.augment.crop_padding
            shifts = torch.randint(-p, p + 1, (n, 2), generator=g).to(self.device) if p else None
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device) if self.augment.flip else None
            if self.augment.erase > 0:  # its own stream: turning erasing on leaves the other draws as they were
                boxes = erase_boxes(n, self.images.shape[1:], self.augment.erase, self._generator(2))
                boxes = boxes.to(self.device)
        for idx in batches[start:]:
            x = self.images[idx]
            if shifts is not None:
                x = translate(x, shifts[idx], self.augment.crop_padding)
            if flips is not None:
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            if boxes is not None:
                x = erase(x, boxes[idx])
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


def erase_boxes(n: int, shape: tuple[int, int, int], p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing draws for ``n`` images of ``shape`` (C, H, W): int64 ``[n, 4 + C]`` rows
    ``(top, left, height, width, fill...)``; a height of 0 leaves the image as it is (probability ``1 - p``).

    Each rectangle covers a uniform share of the image in :data:`ERASE_AREA`, with a log-uniform aspect ratio
    in :data:`ERASE_RATIO`, clipped to the image, at a uniform position where it fits; ``fill`` is one uniform
    uint8 value per channel.
    """
    c, h, w = shape
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 0]) * h * w
    lo, hi = torch.tensor(ERASE_RATIO, dtype=torch.float64).log()
    ratio = (lo + (hi - lo) * u[:, 1]).exp()
    eh = (area * ratio).sqrt().round().clamp(1, h).long()
    ew = (area / ratio).sqrt().round().clamp(1, w).long()
    top = (u[:, 2] * (h - eh + 1)).long().clamp(max=h - 1)
    left = (u[:, 3] * (w - ew + 1)).long().clamp(max=w - 1)
    eh = torch.where(u[:, 4] < p, eh, torch.zeros_like(eh))
    fill = torch.randint(0, 256, (n, c), generator=generator)
    return torch.cat([torch.stack([top, left, eh, ew], 1), fill], 1)


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Fill rectangle ``boxes[i] = (top, left, height, width, fill...)`` of each image of uint8 ``x`` with its
    fill values (one per channel); a height of 0 erases nothing. One masked select for the whole batch."""
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    top, left, eh, ew = (boxes[:, i : i + 1] for i in range(4))
    in_rows = ((rows >= top) & (rows < top + eh)).view(b, 1, h, 1)
    inside = in_rows & ((cols >= left) & (cols < left + ew)).view(b, 1, 1, w)
    return torch.where(inside, boxes[:, 4:].to(x.dtype).view(b, c, 1, 1), x)


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    values = list(values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} normalization values for {channels} channels")
    return values
