"""Images in and out of ``nin serve``: a request's bytes decoded to uint8 ``[C, H, W]`` at the model's stored
size, and a class map drawn over its image as a PNG.

Decoding goes through :func:`nin.decoding.decode_file`, the same code ``nin predict`` reads image files with
(:func:`nin.data.images.decode_image` opens the file and hands it over), so an image sent to the server is
the image ``nin predict`` would classify. The bytes are read from an ``io.BytesIO``: nothing a client sends is
ever used as a path. The header's pixel count is checked against ``max_pixels`` before any pixel is
decoded (a small PNG that declares 100,000 x 100,000 pixels is refused in microseconds), and anything that
decoding the client's bytes raises is the client's fault: a :class:`BadImage` (400), never a 500.

Nothing here imports torch: an ONNX model is served without it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nin.decoding import decode_file, decode_reason
from nin.errors import NinError

FIT = "crop"  # as nin.inference.predict.FIT: another aspect ratio is centre-cropped to the stored size
ALPHA = 0.45  # how much of the heat map shows over the image (as nin cam draws it)
SHOWN = 256  # a small image is enlarged (whole pixels) to about this many pixels on its longer side


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadImage(NinError):
    """A request's image that cannot be used: empty, not an image, truncated, or more pixels than allowed."""


def decode_request_image(data: bytes, name: str, channels: int, size: tuple[int, int],
                         max_pixels: int) -> np.ndarray:
    """uint8 ``[channels, H, W]`` of the image in ``data`` (``name``: what the client called it, for messages)."""
    if not data:
        raise BadImage(f"{name}: empty, not an image")
    try:
        return decode_file(io.BytesIO(data), channels, size, FIT, max_pixels, name)
    except Exception as e:  # noqa: BLE001  whatever a client's bytes make Pillow raise is a bad image
        raise BadImage(f"{name}: {decode_reason(e)}") from None


def small(data: bytes, pixels: int) -> bool:
    """Whether ``data`` is an image whose header declares at most ``pixels`` pixels (read lazily: no pixel is
    decoded); False for anything else, which then goes the long way and gets its reason there."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:  # a PNG's size: bytes 16-24
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big") <= pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height <= pixels
    except Exception:  # noqa: BLE001  not an image, or not one Pillow knows: decoding will say why
        return False


def unit_range(maps: np.ndarray) -> np.ndarray:
    """Each map ``[..., h, w]`` scaled to 0-1 (its minimum 0, its maximum 1; a flat map is all 0)."""
    maps = maps.astype(np.float32)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def _jet(x: np.ndarray) -> np.ndarray:
    """0-1 values as the colours of the 'jet' map (blue, cyan, yellow, red): uint8 ``[..., 3]``."""
    rgb = [np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, axis=-1) * 255).round().astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[C, H, W]`` (1 or 3 channels) as ``[H, W, 3]``."""
    hwc = image.transpose(1, 2, 0)
    return np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc


def cam_png(image: np.ndarray, class_map: np.ndarray, title: str) -> bytes:
    """A PNG of ``image`` (uint8 ``[C, H, W]``) beside the same image with ``class_map`` (``[h, w]``, any scale)
    drawn over it as a heat map, titled ``title``."""
    h, w = image.shape[1:]
    scale = max(1, SHOWN // max(h, w))
    size = (w * scale, h * scale)
    picture = Image.fromarray(np.ascontiguousarray(_rgb(image))).resize(size, Image.Resampling.NEAREST)
    heat = Image.fromarray(unit_range(class_map).astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    colours = _jet(np.clip(np.asarray(heat), 0, 1))
    overlay = (1 - ALPHA) * np.asarray(picture, dtype=np.float32) + ALPHA * colours
    margin, top = 8, 24
    canvas = Image.new("RGB", (2 * size[0] + 3 * margin, size[1] + top + margin), "white")
    canvas.paste(picture, (margin, top))
    canvas.paste(Image.fromarray(overlay.round().astype(np.uint8)), (2 * margin + size[0], top))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)  # Pillow's own font
    except (ImportError, OSError):  # Pillow without FreeType: its bitmap font
        font = ImageFont.load_default()
    try:
        draw.text((margin, 4), title, fill="black", font=font)
    except UnicodeError:  # a bitmap font without the class name's letters
        draw.text((margin, 4), title.encode("ascii", "replace").decode(), fill="black", font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
