"""The lake's layout: every key and prefix of the lake bucket, and nothing else spells one.

```
archive/<batch_id>.zip                         processed ZIPs (batch_id = first 16 hex of the SHA-256)
batches/<batch_id>/products.parquet            accepted products of the batch
batches/<batch_id>/rejects.parquet             row, productid, reason, action, detail
batches/<batch_id>/manifest.json               written last: its presence is the commit
images/<sha256>.jpg                            each image stored once, by content
embeddings/<set_id>/runs/<run_id>/*.parquet    embeddings (a few large files) + _manifest.json (the commit)
embeddings/<set_id>/runs/<run_id>/blocks/      the encoders' per-block files, compacted then deleted
pipeline/<batch_id>.json                       per-stage status of the batch's pipeline
classified/<batch_id>/predictions.parquet      bulk classification of a batch, its submission.csv,
classified/<batch_id>/manifest.json            and its manifest (written last: the commit)
predictions/date=YYYY-MM-DD/<id>.parquet       prediction log
monitoring/<UTC timestamp>/report.{json,html}  drift reports (JSON written last)
```
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

ARCHIVE = "archive/"
BATCHES = "batches/"
IMAGES = "images/"
EMBEDDINGS = "embeddings/"
PIPELINE = "pipeline/"
CLASSIFIED = "classified/"
PREDICTIONS = "predictions/"
MONITORING = "monitoring/"

BATCH_MANIFEST_FILE = "manifest.json"
RUN_MANIFEST_FILE = "_manifest.json"
REPORT_JSON_FILE = "report.json"
REPORT_HTML_FILE = "report.html"
DATE_PARTITION = "date="


# --- batches --------------------------------------------------------------------------------------
def batch_prefix(batch_id: str) -> str:
    return f"{BATCHES}{batch_id}/"


def batch_id_of(prefix: str) -> str:
    """The batch id of a ``batches/<batch_id>/`` prefix."""
    return prefix.removeprefix(BATCHES).strip("/")


def manifest_key(batch_id: str) -> str:
    return f"{batch_prefix(batch_id)}{BATCH_MANIFEST_FILE}"


def products_key(batch_id: str) -> str:
    return f"{batch_prefix(batch_id)}products.parquet"


def rejects_key(batch_id: str) -> str:
    return f"{batch_prefix(batch_id)}rejects.parquet"


def archive_key(batch_id: str) -> str:
    return f"{ARCHIVE}{batch_id}.zip"


def image_key(sha256: str) -> str:
    """Images are stored once, by the SHA-256 of their bytes."""
    return f"{IMAGES}{sha256}.jpg"


# --- embeddings -----------------------------------------------------------------------------------
def embedding_set_prefix(set_id: str) -> str:
    return f"{EMBEDDINGS}{set_id}/runs/"


def embedding_run_prefix(set_id: str, run_id: str) -> str:
    return f"{embedding_set_prefix(set_id)}{run_id}/"


def embedding_run_blocks_prefix(set_id: str, run_id: str) -> str:
    """Where the encoder actors write a block each; readers never look below the run's own prefix."""
    return f"{embedding_run_prefix(set_id, run_id)}blocks/"


def embedding_run_manifest_key(set_id: str, run_id: str) -> str:
    return f"{embedding_run_prefix(set_id, run_id)}{RUN_MANIFEST_FILE}"


# --- bulk classification ---------------------------------------------------------------------------
CLASSIFIED_PREDICTIONS_FILE = "predictions.parquet"
CLASSIFIED_SUBMISSION_FILE = "submission.csv"
CLASSIFIED_MANIFEST_FILE = "manifest.json"  # written last: the classification's commit


def classified_key(batch_id: str, file: str) -> str:
    """A file of one batch's bulk classification (``CLASSIFIED_*_FILE``)."""
    return f"{CLASSIFIED}{batch_id}/{file}"


def classified_batch_of(prefix: str) -> str:
    return prefix.removeprefix(CLASSIFIED).strip("/")


# --- operations -----------------------------------------------------------------------------------
def pipeline_record_key(batch_id: str) -> str:
    return f"{PIPELINE}{batch_id}.json"


def batch_of_pipeline_record(key: str) -> str:
    """The batch id in a ``pipeline_record_key``."""
    return key.removeprefix(PIPELINE).removesuffix(".json")


def prediction_day_prefix(day: datetime) -> str:
    return f"{PREDICTIONS}{DATE_PARTITION}{day:%Y-%m-%d}/"


def prediction_day_of(prefix: str) -> str:
    """``date=YYYY-MM-DD`` of a prediction day prefix (sorts as the day does)."""
    return prefix.removeprefix(PREDICTIONS).rstrip("/")


def prediction_key(timestamp: datetime, file_id: str | None = None) -> str:
    """Object key of one log file: partitioned by the UTC date of its rows."""
    return f"{prediction_day_prefix(timestamp.astimezone(UTC))}{file_id or uuid.uuid4().hex}.parquet"


def monitoring_prefix(created: datetime) -> str:
    """A drift report's prefix: UTC timestamps sort as text."""
    return f"{MONITORING}{created.astimezone(UTC):%Y%m%dT%H%M%SZ}/"
