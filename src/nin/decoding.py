"""Decoding one image from an open binary file object to a uint8 array of the channels and size a model takes
(PNG, JPEG, BMP, GIF, WebP, TIFF), by Pillow, after a check that needs no pixels.

This is the one decoding path: :func:`nin.data.images.decode_image` opens a file a user names and passes it
here, and ``nin serve`` (:mod:`nin.serve.images`) passes a request's bytes in an ``io.BytesIO``. It imports
no torch, so a server of an ONNX file can use it.

The header must declare at most ``cap`` pixels, so memory is bounded by the cap, not by what a file claims
(a decompression bomb is refused before its pixels are decoded). Then the EXIF orientation is applied,
transparency is composited on white, 16-bit and float greyscale are scaled to 0-255, the image is converted
to ``L`` or ``RGB`` and resized, covering the target and centre-cropping (``fit="crop"``) or stretching
(``fit="stretch"``).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nin.errors import NinError

# The default cap on an image's pixels (64 Mi, 67,108,864): every camera and phone photo of common sizes passes
# (61 MP full frame, 9248x6936 in a phone's 64 MP mode), while a header claiming more is refused before its
# pixels are decoded. One RGB image at the cap is 192 MiB decoded, and flattening holds a few copies, so a few
# decoding threads stay within a few GiB. It is below Pillow's own limits (a warning above 89 M pixels, an
# error above 179 M), so ours is the one that applies (see identify).
MAX_PIXELS = 1 << 26

# What Pillow raises on data it cannot decode (not an image, truncated, corrupt, too large).
PILLOW_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError,
    Image.DecompressionBombError,
)


class Refused(NinError):
    """An image refused before its pixels are decoded; ``reason`` is the message without the image's name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.reason = reason


# catch_warnings changes the process's warning filters: two threads inside it at once could leave a filter
# behind, so one decoding thread at a time silences Pillow's warning (while it reads a header: microseconds).
_QUIET_PILLOW = threading.Lock()


ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def _scale_grey(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as ``L``, scaled to 0-255.

    ``I;16`` images use their full range (divide by 257). ``I`` and ``F`` are
    scaled by the range their values actually span: 0-1 (float only) is
    multiplied by 255, 0-255 is kept, 0-65535 is divided by 257, anything else
    is stretched from its minimum to its maximum. Non-finite values become 0.
    """
    values = np.asarray(img).astype(np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):
        values = values / 257.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        values = values * 255.0
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _flatten(img: Image.Image) -> Image.Image:
    """``img`` as ``L`` or ``RGB``: transparency composited on white, other modes converted."""
    if img.mode.startswith("I") or img.mode == "F":
        return _scale_grey(img)
    if img.mode in ALPHA_MODES or img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # P, CMYK, YCbCr, ...


def _resize(img: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    height, width = size
    if img.size == (width, height):  # already the model's size: resizing would only copy it
        return img
    if fit == "crop":
        return ImageOps.fit(img, (width, height), method=Image.Resampling.BILINEAR)
    return img.resize((width, height), Image.Resampling.BILINEAR)


@contextlib.contextmanager
def _pillow_quiet(quiet: bool = True) -> Iterator[None]:
    """While inside (if ``quiet``), Pillow's ``DecompressionBombWarning`` is not shown: our cap decides."""
    if not quiet:
        yield
        return
    with _QUIET_PILLOW, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _above_cap(name: str, pixels: str, cap: int) -> Refused:
    return Refused(name, f"{pixels} pixels, above the cap of {cap:,} (raise it with --max-pixels)")


def identify(f: BinaryIO, name: str, cap: int) -> Image.Image:
    """``Image.open`` of the open file ``f`` (its header only), refused if it has more than ``cap`` pixels.

    Pillow checks the size first, against its own ``Image.MAX_IMAGE_PIXELS`` (89 M by default): it would
    warn above it, so its warning is silenced while it reads the header, and it raises above twice it,
    which becomes our refusal. Only a cap raised above that (179 M) cannot be honoured: Pillow's limit is
    global, and is not changed here.
    """
    try:
        with _pillow_quiet():
            img = Image.open(f)
    except UnidentifiedImageError:  # Pillow names a file object by its repr; name the image
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    except Image.DecompressionBombError:
        most = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if cap < most:
            raise _above_cap(name, f"more than {most:,}", cap) from None
        raise Refused(name, f"more than {most:,} pixels, Pillow's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS), "
                            "which --max-pixels does not raise") from None
    width, height = img.size
    if width * height > cap:
        img.close()
        raise _above_cap(name, f"{width}x{height} = {width * height:,}", cap)
    return img


def decode_file(f: BinaryIO, channels: int, size: tuple[int, int], fit: str, cap: int, name: str) -> np.ndarray:
    """Decode the image in the open binary file ``f`` into a uint8 array [channels, H, W].

    ``name`` names the image in messages. A header declaring more than ``cap`` pixels is a :class:`Refused`,
    raised before any pixel is decoded; otherwise raises whatever Pillow raises for data it cannot decode
    (see :data:`PILLOW_ERRORS`).
    """
    limit = Image.MAX_IMAGE_PIXELS
    with identify(f, name, cap) as opened:
        # Pillow checks frame sizes again as it decodes some formats: that can only warn under a raised cap
        with _pillow_quiet(limit is not None and cap > limit):
            opened.load()  # decode now, so truncated files fail here (first frame of animations)
        ImageOps.exif_transpose(opened, in_place=True)  # (in place: no copy of an image with no orientation)
        img = _flatten(opened)
        mode = "L" if channels == 1 else "RGB"
        array = np.asarray(_resize(img if img.mode == mode else img.convert(mode), size, fit))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_reason(exc: BaseException) -> str:
    """Why an image could not be decoded, without its name: a refusal's reason, or Pillow's message."""
    if isinstance(exc, Refused):
        return exc.reason
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot decode image: {message}"
