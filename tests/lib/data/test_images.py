"""Image validation (pure: images built in memory)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lib.data.images import CorruptImage, check_image

LIMITS = {"max_pixels": 10_000_000, "max_bytes": 10_000_000}


def jpeg(progressive: bool) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (500, 500, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85, progressive=progressive)
    return out.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept", [0.5, 0.9, 0.99])
def test_a_jpeg_cut_anywhere_is_refused_although_validation_decodes_at_a_small_scale(progressive, kept):
    data = jpeg(progressive)
    check_image(data, **LIMITS)  # the whole file is fine
    with pytest.raises(CorruptImage, match="corrupt image"):
        check_image(data[: int(len(data) * kept)], **LIMITS)
