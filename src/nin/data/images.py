"""Decoding one image file to a uint8 array of the channels and size a model takes (PNG, JPEG, BMP, GIF, WebP,
TIFF), after two checks that need no pixels.

The file must be a regular file (opened without blocking, so a FIFO or a device is refused, never read), and
its header must declare at most ``max_pixels`` pixels (:data:`MAX_PIXELS` by default), so memory is bounded
by the cap, not by what a file claims. The open file then goes through :func:`nin.decoding.decode_file`, the
decoding path that ``nin serve`` uses for a request's bytes too: the EXIF orientation is applied,
transparency is composited on white, 16-bit and float greyscale are scaled to 0-255, the image is converted
to ``L`` or ``RGB`` and resized, covering the target and centre-cropping (``fit="crop"``) or stretching
(``fit="stretch"``)."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from nin.data.idx import DataError
from nin.decoding import MAX_PIXELS, PILLOW_ERRORS, Refused, decode_file, decode_reason
from nin.files import open_regular

__all__ = ["DECODE_ERRORS", "MAX_PIXELS", "ImageError", "decode_image", "pixel_cap"]


class ImageError(DataError, Refused):
    """An image file refused before its pixels are decoded: not a regular file, or more pixels than allowed.

    ``reason`` is the message without the file name, as the folder loader and ``nin predict`` list it.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str):
        super().__init__(os.fspath(path), reason)


# What decoding one file may raise: ImageError, and what Pillow raises on files it cannot decode (not an
# image, truncated, corrupt, too large).
DECODE_ERRORS = (ImageError, *PILLOW_ERRORS)


def pixel_cap(max_pixels: int | None) -> int:
    """The cap on an image's pixels: ``max_pixels``, or :data:`MAX_PIXELS` for None; else a :class:`DataError`."""
    if max_pixels is None:
        return MAX_PIXELS
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive integer, not {max_pixels!r}")
    return max_pixels


def _open_file(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; else an :class:`ImageError` saying what it is."""
    try:
        return open_regular(path, error=DataError)
    except DataError as exc:
        raise ImageError(path, str(exc).removeprefix(f"{path}: ")) from None


def decode_image(path: str | os.PathLike[str], channels: int, size: tuple[int, int], fit: str,
                 max_pixels: int | None = None) -> np.ndarray:
    """Decode one image file into a uint8 array [channels, H, W].

    The file must be a regular file (opened without blocking: a FIFO, a device or a directory is
    refused, never read) whose header declares at most ``max_pixels`` pixels (None: :data:`MAX_PIXELS`),
    checked before any pixel is decoded; either is an :class:`ImageError`. Otherwise raises whatever
    Pillow raises for a file it cannot decode (see :data:`DECODE_ERRORS`).
    """
    cap = pixel_cap(max_pixels)
    with _open_file(path) as f:
        try:
            return decode_file(f, channels, size, fit, cap, os.fspath(path))
        except Refused as e:
            raise ImageError(path, e.reason) from None


_decode_reason = decode_reason  # the name the folder loader and nin predict import
