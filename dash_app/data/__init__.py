"""Cached, bounded readers for the dashboard: each returns a small DataFrame or dict, never a whole table.

Every read goes through one :class:`DataSource` (one per app), a facade over one reader per concern:

- ``lake.py`` — catalogue aggregates, gallery images, the similarity index of catalogue embeddings;
- ``runs.py`` — the MLflow registry and training runs;
- ``serving.py`` — predictions from Serve, and the similar-products search;
- ``monitoring.py`` — the prediction log and the drift reports;
- ``services.py`` — what they share: the caches (``cache.py``), the S3 client and a health guard.

Reads are cached for ``settings.dash_cache_ttl_s``; a service that is down raises :class:`Unavailable` with
a message meant for the user, after a short health probe (so a stopped stack costs milliseconds, not client
retry loops).
"""

from dash_app.data.cache import TTLCache
from dash_app.data.lake import Catalogue, SimilarityIndex, sample_per_class
from dash_app.data.monitoring import tidy_predictions
from dash_app.data.runs import ModelInfo, RunDetails
from dash_app.data.services import Unavailable
from dash_app.data.serving import decode_upload
from dash_app.data.source import DataSource

__all__ = [
    "Catalogue",
    "DataSource",
    "ModelInfo",
    "RunDetails",
    "SimilarityIndex",
    "TTLCache",
    "Unavailable",
    "decode_upload",
    "sample_per_class",
    "tidy_predictions",
]
