"""The serving logic as pure functions: request parsing and validation, scoring, top-5, auth, health.

Nothing here imports Ray; the deployments in :mod:`serve.app` only move data between these functions.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import numpy as np
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError

from lib.data.images import ImageRejected, ImageTooLarge, NotAnImage, check_image
from lib.data.rakuten import class_name
from lib.data.text import clean_text, lexical_text, product_text
from lib.ops.predlog import TOP_K, input_hash
from lib.settings import Settings

JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data",)
TEXT_FIELDS = ("designation", "description")
IMAGE_FIELD = "image"
IMAGE_B64_FIELD = "image_base64"
WAITING = "waiting for a production model"
UNAVAILABLE = "model deployment unavailable"


class InputError(Exception):
    """A request the service refuses, with its HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class PredictInput:
    """One validated product: cleaned fields, the encoder's text, the image bytes, the input hash."""

    designation: str
    description: str
    text: str
    image: bytes | None
    input_hash: str
    # Wall-clock time the request was parsed (epoch s): the prediction log's latency runs from it to the
    # answer, and its timestamps are wall-clock too.
    received_at: float = field(default_factory=time.time)

    @property
    def has_text(self) -> bool:
        return bool(self.text.strip())

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def lexical_text(self, max_chars: int) -> str:
        """What a head's TF-IDF block reads (as in training: ``lib.data.text.lexical_text``)."""
        return lexical_text(self.designation, self.description, max_chars)


# --- request parsing --------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """``multipart/form-data; boundary=x`` → ``multipart/form-data``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 when the Content-Length header already exceeds the body limit."""
    if content_length and content_length.strip().isdigit() and int(content_length) > limit:
        raise InputError(413, f"request body of {int(content_length)} bytes exceeds the limit of {limit}")


def decode_utf8(raw: bytes | str | None, field: str) -> str | None:
    """Strict UTF-8 (422 on invalid bytes)."""
    if raw is None or isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(422, f"field {field!r} is not valid UTF-8 (byte {exc.start})") from exc


def parse_json(body: bytes) -> Any:
    """The JSON document of a body (422: empty body, invalid UTF-8, invalid JSON)."""
    if not body.strip():
        raise InputError(422, "empty request body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(422, f"request body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(422, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Fields and files of a ``multipart/form-data`` body, as raw bytes by field name (first wins)."""
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise InputError(422, "multipart body without a boundary in its Content-Type")
    if not body.strip():
        raise InputError(422, "empty request body")
    parts: dict[str, bytes] = {}
    state: dict[str, Any] = {"header": b"", "value": b"", "headers": {}, "data": []}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header"].decode("latin-1").lower()] = state["value"].decode("latin-1")
        state["header"], state["value"] = b"", b""

    def on_part_begin() -> None:
        state["headers"], state["data"] = {}, []

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        disposition = Message()
        disposition["content-disposition"] = state["headers"].get("content-disposition", "")
        name = disposition.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in parts:
            parts[name] = b"".join(state["data"])

    callbacks = {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InputError(422, f"malformed multipart body: {exc}") from exc
    return parts


def decode_base64_image(value: Any, max_bytes: int) -> bytes | None:
    """Image bytes from a base64 string (a ``data:...;base64,`` URL prefix is accepted)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(422, f"{IMAGE_B64_FIELD!r} must be a base64 string")
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InputError(413, f"image larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(422, f"{IMAGE_B64_FIELD!r} is not valid base64: {exc}") from exc


def check_image_header(data: bytes, max_bytes: int, max_pixels: int) -> None:
    """Cheap checks from the bytes and the image header only (the full decode runs in the encoder).

    413: too many bytes or pixels; 415: not an image format Pillow knows; 422: a broken header.
    """
    try:
        check_image(data, max_pixels, max_bytes, decode=False)
    except ImageTooLarge as err:
        raise InputError(413, str(err)) from err
    except NotAnImage as err:
        raise InputError(415, str(err)) from err
    except ImageRejected as err:
        raise InputError(422, str(err)) from err


def build_input(
    designation: str | None, description: str | None, image: bytes | None, settings: Settings
) -> PredictInput:
    """Clean and assemble one product exactly as training did; 422 when it carries neither modality."""
    if image is not None and len(image) == 0:
        image = None  # an empty file part: a form submitted without choosing a file
    if image is not None:
        check_image_header(image, settings.max_image_bytes, settings.max_image_pixels)
    cap = settings.max_field_chars
    designation_clean, description_clean = clean_text(designation, cap), clean_text(description, cap)
    text = product_text(designation_clean, description_clean, settings.text_max_chars)
    if not text.strip() and image is None:
        raise InputError(422, "give at least one of 'designation', 'description' or an image")
    digest = input_hash(designation_clean, description_clean, image)
    return PredictInput(designation_clean, description_clean, text, image, digest)


def _text_value(obj: dict, field: str) -> str | None:
    value = obj.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a numeric title is still a title
    raise InputError(422, f"field {field!r} must be a string")


def input_from_json(obj: Any, settings: Settings) -> PredictInput:
    """One JSON object ``{designation, description, image_base64}`` → a validated input."""
    if not isinstance(obj, dict):
        raise InputError(422, "expected a JSON object with 'designation', 'description', 'image_base64'")
    image = decode_base64_image(obj.get(IMAGE_B64_FIELD), settings.max_image_bytes)
    return build_input(_text_value(obj, "designation"), _text_value(obj, "description"), image, settings)


def parse_predict(body: bytes, content_type: str | None, settings: Settings) -> PredictInput:
    """``POST /predict``: a multipart form or a JSON object."""
    kind = media_type(content_type)
    if kind in FORM_TYPES:
        parts = parse_multipart(body, content_type or "")
        designation, description = (decode_utf8(parts.get(f), f) for f in TEXT_FIELDS)
        return build_input(designation, description, parts.get(IMAGE_FIELD), settings)
    if kind in JSON_TYPES or (not kind and body.strip()[:1] in (b"{", b"[")):
        return input_from_json(parse_json(body), settings)
    if not body.strip():
        raise InputError(422, "empty request body")
    raise InputError(415, f"unsupported Content-Type {kind!r}: send multipart/form-data or application/json")


def parse_batch(body: bytes, content_type: str | None, settings: Settings) -> list[PredictInput]:
    """``POST /predict/batch``: a JSON list of objects, at most ``serve_max_batch_items``."""
    kind = media_type(content_type)
    if kind and kind not in JSON_TYPES:
        raise InputError(415, f"unsupported Content-Type {kind!r}: send a JSON list")
    items = parse_json(body)
    if not isinstance(items, list) or not items:
        raise InputError(422, "expected a non-empty JSON list of products")
    if len(items) > settings.serve_max_batch_items:
        raise InputError(
            413, f"{len(items)} products exceed the batch limit of {settings.serve_max_batch_items}"
        )
    out = []
    for i, item in enumerate(items):
        try:
            out.append(input_from_json(item, settings))
        except InputError as exc:
            raise InputError(exc.status, f"item {i}: {exc.detail}") from exc
    return out


# --- encoders ----------------------------------------------------------------------------------------


def encode_isolating(encode: Callable[[list[bytes]], np.ndarray], images: list[bytes]) -> list:
    """Encode a batch; if it fails, encode one by one so one corrupt image fails alone.

    Returns per image either its embedding row or an error message (str).
    """
    try:
        return list(encode(images))
    except Exception:
        out: list = []
        for data in images:
            try:
                out.append(encode([data])[0])
            except Exception as exc:
                out.append(f"corrupt image: {type(exc).__name__}: {exc}")
        return out


def split_groups(rows: Sequence, sizes: Sequence[int]) -> list[list]:
    """Undo the flattening of a batch of groups: consecutive slices of ``rows`` of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(list(rows[start : start + size]))
        start += size
    return out


def chunk_sizes(items: int, parts: int, min_size: int) -> list[int]:
    """Sizes of up to ``parts`` near-equal consecutive chunks of ``items``, none below ``min_size`` (one
    chunk when there are too few items to split)."""
    parts = max(1, min(parts, items // max(min_size, 1)))
    base, extra = divmod(items, parts)
    return [base + (i < extra) for i in range(parts)]


def scatter(present: Sequence[bool], rows: Sequence) -> list:
    """Per-item rows, None where ``present`` is False: an encoder saw only the items that have its
    modality, in order."""
    row_iter = iter(rows)
    return [next(row_iter) if has else None for has in present]


# --- scoring -----------------------------------------------------------------------------------------


def card_class_name(card: dict, code: int) -> str:
    return card.get("class_names", {}).get(str(code)) or class_name(code)


def top_k(probs: np.ndarray, codes: Sequence[int], card: dict, k: int = TOP_K) -> list[dict]:
    """The ``k`` most probable classes of one row, best first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {
            "prdtypecode": int(codes[i]),
            "class_name": card_class_name(card, int(codes[i])),
            "score": float(probs[i]),
        }
        for i in order
    ]


def prediction(
    probs: np.ndarray, card: dict, threshold: float, model_name: str, model_version: str | None
) -> dict:
    """The response body of one product from its class probabilities."""
    top = top_k(probs, card["codes"], card)
    best = top[0]
    return {
        "prdtypecode": best["prdtypecode"],
        "class_name": best["class_name"],
        "confidence": best["score"],
        "top5": top,
        "model_name": model_name,
        "model_version": model_version,
        "abstained": best["score"] < threshold,
    }


def stack_inputs(vectors: Sequence[np.ndarray | None], dim: int) -> np.ndarray:
    """A (n, dim) float32 matrix; a missing modality (None) is a zero row, as in training."""
    out = np.zeros((len(vectors), dim), np.float32)
    for i, vector in enumerate(vectors):
        if vector is not None:
            out[i] = vector
    return out


def error_result(status: int, detail: str) -> dict:
    """What a deployment returns for one item it cannot answer (batches never raise)."""
    return {"error": {"status": status, "detail": detail}}


# --- model swap ------------------------------------------------------------------------------------------


def running_encoders(text_key: str, image_key: str, set_id: str) -> dict:
    return {"encoder_set_id": set_id, "text_encoder": text_key, "image_encoder": image_key}


def incompatibility(card: dict, running: dict) -> str | None:
    """Why a model cannot be served by the running encoders, or None when it can."""
    for key in ("encoder_set_id", "text_encoder", "image_encoder"):
        if card.get(key) != running[key]:
            return f"card {key} {card.get(key)!r} differs from the running {running[key]!r}"
    return None


# --- health ---------------------------------------------------------------------------------


def health(info: dict | None) -> tuple[int, dict]:
    """Status code and body of ``GET /health`` from the model deployment's info."""
    if not info or "model_error" in info:
        return 503, {"status": UNAVAILABLE, **(info or {})}
    if not info.get("model_version"):
        return 503, {"status": WAITING, **info}
    return 200, {"status": "ok", **info}
