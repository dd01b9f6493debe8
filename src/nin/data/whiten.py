"""Global contrast normalization (GCN) and ZCA whitening, fitted once and applied per batch on the device.

This is the input preprocessing of the Network-in-Network paper's CIFAR-10/100
experiments (Lin, Chen & Yan, "Network In Network", arXiv:1312.4400, 2013), which reuses
the maxout paper's (Goodfellow et al., "Maxout Networks", ICML 2013): the pylearn2
recipe of GCN with scale 55 followed by ZCA whitening with a regularizer of 0.1
added to the eigenvalues.

Each image is treated as one vector ``x`` of ``D = C*H*W`` values on the 0-1 scale.

GCN (per image, no fitted state), the semantics of pylearn2's
``global_contrast_normalize`` with its defaults (normalize by the vector norm, not
by the standard deviation)::

    c = x - mean(x)                                  # over all pixels and channels; exactly 0 if x is flat
    d = sqrt(eps + sum(c**2)) / scale                # eps: pylearn2's ``sqrt_bias``
    d = 1 if d < min_divisor else d                  # no contrast: the image is only centred
    gcn(x) = c / d

(Setting ``c`` of a flat image to exactly 0 is our addition: its float rounding residue,
about 1e-7, would otherwise be scaled up some 1e5 times.)

With the defaults (eps = min_divisor = 1e-8, scale 55) the divisor is at least
sqrt(eps) / scale > min_divisor, so eps bounds it and the clamp only acts for eps = 0.
So a GCN'd image has mean 0 and Euclidean norm ``scale * sqrt(S / (S + eps))`` with
``S = sum(c**2)``, i.e. ``scale`` for any image with contrast; its per-value RMS is
``scale / sqrt(D)``. The scale 55 is about ``sqrt(3072)``, so for 3x32x32 CIFAR
images each value has RMS about 1. (Dividing by the standard deviation instead
would make that RMS 55 and the ZCA regularizer below far weaker than in the papers.)

ZCA (fitted on the GCN'd training images ``X``, ``N x D``)::

    mu  = mean of the rows of X
    cov = (X - mu)^T (X - mu) / N = U diag(S) U^T    # torch.linalg.eigh, in float64
    W   = U diag(1 / sqrt(S + eps)) U^T              # eps: pylearn2's ``filter_bias``, 0.1
    zca(x) = (gcn(x) - mu) W                         # W is symmetric

``W`` is the whitening matrix closest to the identity (it keeps each whitened
image as close as possible to the centred original, hence "zero-phase"); ``eps``
damps the directions whose variance is below about ``eps`` rather than amplifying
them (pixel noise, the direction GCN removes). With eps = 0.1 on data whose total
variance is about 55^2 = 3025, the fine, low-variance directions are shrunk.
The covariance is accumulated over chunks of images, so the ``N x D`` float64
matrix is never held whole; at most ``max_images`` (a seeded random subset) are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nin.errors import NinError
from nin.files import check_regular

MAX_FEATURES = 8192  # the D x D float64 covariance is 512 MiB there; eigh costs O(D^3)
GCN_EPS = 1e-8  # the GCN constants applied at fit and batch time alike
GCN_MIN_DIVISOR = 1e-8


def global_contrast_normalize(
    x: torch.Tensor, scale: float = 55.0, eps: float = 1e-8, min_divisor: float = 1e-8
) -> torch.Tensor:
    """GCN of each image of ``x`` (``[B, ...]``, float): see the module docstring for the formula.

    Returns a contiguous tensor of ``x``'s shape and dtype where each image has mean 0 and Euclidean
    norm ``scale * sqrt(S / (S + eps))`` (``S``: the image's sum of squared centred values); an
    image whose divisor is below ``min_divisor`` (no contrast) is only centred.
    """
    flat = x.flatten(1)
    centred = flat - flat.mean(1, keepdim=True)
    # A flat image centres to exactly 0: its rounding residue (~1e-7) would otherwise be scaled up ~1e5 times.
    low, high = flat.aminmax(dim=1, keepdim=True)
    centred = centred.masked_fill(low == high, 0.0)
    divisor = centred.square().sum(1, keepdim=True).add_(eps).sqrt_().div_(scale)
    divisor = torch.where(divisor < min_divisor, torch.ones_like(divisor), divisor)
    return (centred / divisor).reshape(x.shape)


@dataclass(frozen=True, eq=False)
class Whitening:
    """Fitted GCN + ZCA transform for images of one shape."""

    mean: torch.Tensor  # float32 [D]: the mean of the GCN'd training images
    matrix: torch.Tensor  # float32 [D, D]: the symmetric ZCA matrix U diag(1/sqrt(S + eps)) U^T
    shape: tuple[int, int, int]  # (C, H, W)
    gcn_scale: float | None  # None: no GCN
    eps: float  # the regularizer added to the eigenvalues

    def __post_init__(self) -> None:
        d = _features(self.shape)
        if tuple(self.mean.shape) != (d,) or tuple(self.matrix.shape) != (d, d):
            raise NinError(
                f"whitening for images {_fmt(self.shape)} needs a mean of {d} values and a {d}x{d} matrix, "
                f"got {tuple(self.mean.shape)} and {tuple(self.matrix.shape)}"
            )
        if self.gcn_scale is not None and not self.gcn_scale > 0:
            raise NinError(f"GCN scale must be positive, got {self.gcn_scale}")
        if not self.eps > 0:
            raise NinError(f"ZCA eps must be positive, got {self.eps}")

    @property
    def features(self) -> int:
        return self.mean.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten float images ``[B, C, H, W]`` on the 0-1 scale (any memory format, any device).

        Returns contiguous float32 ``[B, C, H, W]`` on ``x``'s device. Call :meth:`to` once to put the
        transform on that device; otherwise its tensors are copied there on every call.
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise NinError(f"whitening was fitted for images {_fmt(self.shape)}, got a batch {tuple(x.shape)}")
        if not x.is_floating_point():
            raise NinError(f"whitening takes float images on the 0-1 scale, got {x.dtype}")
        flat = x.flatten(1).float()  # a channels_last batch is copied into C, H, W order here
        if self.gcn_scale is not None:
            flat = global_contrast_normalize(flat, self.gcn_scale, GCN_EPS, GCN_MIN_DIVISOR)
        out = (flat - self.mean.to(x.device)) @ self.matrix.to(x.device)
        return out.view(x.shape)

    def to(self, device: torch.device | str) -> Whitening:
        return replace(self, mean=self.mean.to(device), matrix=self.matrix.to(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: ``mean``, ``matrix``, ``shape`` (int64 [3]), ``eps`` and, with GCN, ``gcn_scale``."""
        state = {
            "mean": self.mean,
            "matrix": self.matrix,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "eps": torch.tensor([self.eps], dtype=torch.float64),
        }
        if self.gcn_scale is not None:
            state["gcn_scale"] = torch.tensor([self.gcn_scale], dtype=torch.float64)
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Whitening:
        missing = [k for k in ("mean", "matrix", "shape", "eps") if k not in state]
        if missing:
            raise NinError(f"whitening state lacks {', '.join(missing)}")
        shape = tuple(int(v) for v in state["shape"].flatten().tolist())
        if len(shape) != 3:
            raise NinError(f"whitening state has image shape {shape}, expected (C, H, W)")
        gcn = state.get("gcn_scale")
        return cls(
            mean=state["mean"].float(),
            matrix=state["matrix"].float(),
            shape=shape,  # type: ignore[arg-type]
            gcn_scale=None if gcn is None else _scalar(gcn, "gcn_scale"),
            eps=_scalar(state["eps"], "eps"),
        )

    def save(self, path: str | os.PathLike) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        """Read a file written by :meth:`save`; any problem is a one-line :class:`NinError` naming the file."""
        check_regular(path, error=NinError)  # a FIFO or a device would block or never end
        try:
            return cls.from_state_dict(load_file(os.fspath(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise NinError(f"{path}: unreadable whitening file ({_one_line(e)})") from None
        except NinError as e:
            raise NinError(f"{path}: {_one_line(e)}") from None


def fit_whitening(
    images: torch.Tensor,
    *,
    gcn_scale: float | None = 55.0,
    eps: float = 0.1,
    max_images: int | None = 50_000,
    seed: int = 0,
    _chunk: int = 4096,
) -> Whitening:
    """Fit GCN + ZCA on uint8 training images ``[N, C, H, W]`` (on any device; the fit runs on the CPU).

    ``gcn_scale=None`` skips GCN; ``eps`` is added to the covariance eigenvalues; when ``N > max_images``
    a random subset of ``max_images`` images drawn with ``seed`` is used; ``_chunk`` images at a time are
    converted to float64 for the covariance. See the module docstring.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise NinError(f"whitening is fitted on uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    n, shape = len(images), (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    d = _features(shape)
    if d > MAX_FEATURES:
        raise NinError(f"ZCA over {d} features ({_fmt(shape)} images) is too large: at most {MAX_FEATURES}")
    if gcn_scale is not None and not gcn_scale > 0:
        raise NinError(f"GCN scale must be positive, got {gcn_scale}")
    if not eps > 0:
        raise NinError(f"ZCA eps must be positive, got {eps}")
    if max_images is not None and max_images < 2:
        raise NinError(f"max_images must be at least 2, got {max_images}")
    if n < 2:
        raise NinError(f"whitening needs at least 2 images to fit, got {n}")
    index = None
    if max_images is not None and n > max_images:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    mean, cov = _moments(images, index, gcn_scale, _chunk)
    s, u = torch.linalg.eigh(cov)
    matrix = (u * s.clamp(min=0).add(eps).rsqrt()) @ u.T
    matrix = (matrix + matrix.T) / 2  # exactly symmetric
    return Whitening(mean=mean.float(), matrix=matrix.float(), shape=shape, gcn_scale=gcn_scale, eps=float(eps))


def _moments(
    images: torch.Tensor, index: torch.Tensor | None, gcn_scale: float | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 mean ``[D]`` and covariance ``[D, D]`` (divided by N) of the (GCN'd) images, chunk by chunk."""
    n = len(images) if index is None else len(index)
    total = torch.zeros(_features(tuple(images.shape[1:])), dtype=torch.float64)
    for x in _chunks(images, index, gcn_scale, chunk):
        total += x.sum(0)
    mean = total / n
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64)
    for x in _chunks(images, index, gcn_scale, chunk):
        x -= mean
        cov.addmm_(x.T, x)
    return mean, cov.div_(n)


def _chunks(
    images: torch.Tensor, index: torch.Tensor | None, gcn_scale: float | None, chunk: int
) -> Iterator[torch.Tensor]:
    """The images (or ``images[index]``) as float64 ``[b, D]`` CPU rows on the 0-1 scale, GCN'd if asked."""
    n = len(images) if index is None else len(index)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk) if index is None else index[start : start + chunk].to(images.device)
        x = images[rows].cpu().flatten(1).double().div_(255.0)
        yield x if gcn_scale is None else global_contrast_normalize(x, gcn_scale, GCN_EPS, GCN_MIN_DIVISOR)


def _features(shape: tuple[int, ...]) -> int:
    if len(shape) != 3 or min(shape) < 1:
        raise NinError(f"whitening needs an image shape (C, H, W) of positive sizes, got {tuple(shape)}")
    return shape[0] * shape[1] * shape[2]


def _scalar(t: torch.Tensor, name: str) -> float:
    if t.numel() != 1:
        raise NinError(f"whitening state: {name} should hold one value, got shape {tuple(t.shape)}")
    return float(t.flatten()[0])


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
