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


def image_problem(data: bytes, max_pixels: int, max_bytes: int) -> str | None:
    """Why ``data`` is not a usable image (a reason constant), or None when it is fine.

    The pixel count is read from the header before decoding, so a decompression bomb is refused
    without allocating its pixels; a truncated file is caught by a full decode.
    """
    if not data:
        return IMAGE_MISSING
    if len(data) > max_bytes:
        return IMAGE_TOO_LARGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return IMAGE_TOO_LARGE
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return IMAGE_TOO_LARGE
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return IMAGE_UNREADABLE
    return None


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (raises on unreadable data)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
