"""Image validation and decoding, shared by ingestion, embedding and serving."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

# Reasons an image is not usable (also the values of the ingest reject report).
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TOO_LARGE = "image_too_large"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageRejected(Exception):
    """The bytes are not a usable image; ``reason`` is one of the reason constants, the message says why."""

    reason = IMAGE_UNREADABLE


class ImageMissing(ImageRejected):
    reason = IMAGE_MISSING


class ImageTooLarge(ImageRejected):
    reason = IMAGE_TOO_LARGE


class NotAnImage(ImageRejected):
    """No image format Pillow knows."""


class CorruptImage(ImageRejected):
    """A known format whose header or data is broken (e.g. truncated)."""


def check_image(data: bytes, max_pixels: int, max_bytes: int, decode: bool = True) -> None:
    """Raise :class:`ImageRejected` (naming the problem) unless ``data`` is a usable image.

    The pixel count is read from the header before decoding, so a decompression bomb is refused
    without allocating its pixels. ``decode`` also decodes the pixels (a JPEG at its smallest scale),
    which catches a truncated file; without it only the header is read (Serve: its image encoder decodes
    anyway).
    """
    if not data:
        raise ImageMissing("empty image")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
                if decode:
                    # A JPEG decoded at 1/8 scale still reads its whole entropy-coded stream, so truncation
                    # is caught, in ~40 % of the time of a full decode (ingest's CPU per image).
                    img.draft(None, (1, 1))
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"image has too many pixels (limit {max_pixels})") from err
    except UnidentifiedImageError as err:
        raise NotAnImage("the uploaded file is not an image (JPEG, PNG, WebP, ...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImage(f"corrupt image: {err}") from err


def image_problem(data: bytes, max_pixels: int, max_bytes: int) -> str | None:
    """Why ``data`` is not a usable image (a reason constant), or None when it is fine."""
    try:
        check_image(data, max_pixels, max_bytes)
    except ImageRejected as err:
        return err.reason
    return None


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (raises on unreadable data)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
