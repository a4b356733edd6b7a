"""The prediction service and the similar-products search: POST /predict, and the query encoded here."""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass, field

import httpx
import numpy as np
import pandas as pd

from dash_app.data.lake import LakeReader
from dash_app.data.runs import RunsReader
from dash_app.data.services import Services, Unavailable
from lib.data.text import clean_text, product_text
from lib.features.encoders import build_image_encoder, build_text_encoder, encoder_ids, encoder_set_id
from lib.settings import Settings

log = logging.getLogger(__name__)


def decode_upload(contents: str | None) -> bytes | None:
    """The bytes of a ``dcc.Upload`` data URI (``data:<type>;base64,<payload>``)."""
    if not contents:
        return None
    _, _, payload = contents.partition(",")
    return base64.b64decode(payload or contents)


def error_detail(response: httpx.Response) -> str:
    """The ``detail`` of an error response (`{"detail": ...}`, as the API answers), else its body."""
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


@dataclass
class QueryEncoders:
    """The text and image encoders, built once on first use (they cost ~300 MB and a second to load)."""

    settings: Settings
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _encoders: tuple | None = None

    def get(self) -> tuple:
        with self._lock:
            if self._encoders is None:
                self._encoders = (build_text_encoder(self.settings), build_image_encoder(self.settings))
            return self._encoders

    def encode(self, text: str, image: bytes | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(text row, image row); None for an absent modality."""
        text_encoder, image_encoder = self.get()
        with self._lock:  # the encoders keep per-instance buffers; one query at a time is plenty here
            q_text = text_encoder.encode([text])[0] if text.strip() else None
            q_image = image_encoder.encode([image])[0] if image else None
        return q_text, q_image


class ServingClient:
    """Predictions from the Serve endpoint, and the catalogue products most similar to a query."""

    def __init__(self, services: Services, lake: LakeReader, runs: RunsReader) -> None:
        self.services = services
        self.settings = services.settings
        self.lake = lake
        self.runs = runs
        self.encoders = QueryEncoders(services.settings)

    def predict(self, designation: str, description: str, image: bytes | None) -> dict:
        """POST the product to the Serve endpoint; the response as a dict."""
        payload = {
            "designation": designation,
            "description": description,
            "image_base64": base64.b64encode(image).decode() if image else None,
        }
        token = self.settings.serve_auth_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        timeout = self.settings.dash_request_timeout_s
        try:
            response = httpx.post(
                f"{self.settings.serve_url}/predict", json=payload, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as err:
            raise Unavailable(f"The prediction service did not answer within {timeout:g} s.") from err
        except httpx.HTTPError as err:  # not deployed, or the stack is down
            raise Unavailable(self.services.down_message("serve")) from err
        if response.status_code >= 400:
            raise Unavailable(
                f"The prediction service answered {response.status_code}: {error_detail(response)}"
            )
        return response.json()

    def similar(self, designation: str, description: str, image: bytes | None) -> tuple[pd.DataFrame, str]:
        """The most similar catalogue products to a query, and a note on how they were found.

        The Serve response carries no embedding, so the query is encoded here with the same encoders
        (loaded once, lazily) and compared with a bounded sample of catalogue embeddings.
        """
        k = self.settings.dash_similar_products
        if k <= 0 or self.settings.dash_similarity_rows <= 0:
            raise Unavailable("Similar products are switched off (RAKUTEN_DASH_SIMILARITY_ROWS=0).")
        self._require_comparable_encoders()
        index = self.lake.similarity_index()
        if len(index.products) == 0:
            raise Unavailable("The catalogue has no embeddings for the production model's encoders yet.")
        cap = self.settings.max_field_chars
        text = product_text(
            clean_text(designation, cap), clean_text(description, cap), self.settings.text_max_chars
        )
        try:
            q_text, q_image = self.encoders.encode(text, image)
        except Exception as err:
            log.warning("dashboard: query encoding failed", exc_info=True)
            raise Unavailable(f"Could not encode the query: {type(err).__name__}: {err}") from err
        note = f"cosine similarity over a sample of {len(index.products):,} of {index.total:,} products"
        return index.top(q_text, q_image, k), note

    def _require_comparable_encoders(self) -> None:
        """The production model's encoder set must be the dashboard's: other vectors are not comparable."""
        production = self.runs.model("production")
        if production is None:
            raise Unavailable("No production model yet, so no embedding space to search.")
        set_id = production.encoder_set_id or self.runs.card(production.version).get("encoder_set_id")
        if set_id != encoder_set_id(*encoder_ids(self.settings)):
            raise Unavailable(
                f"The production model uses encoder set {set_id}, the dashboard's settings another one: "
                "similar products would not be comparable."
            )
