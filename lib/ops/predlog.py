"""The prediction log: one row per served prediction, appended to the lake in small Parquet files.

Layout: one Parquet file per flush, by UTC day (``lib.data.layout.prediction_key``). A row holds what
monitoring needs (time, model version, modalities present, predicted code, confidence, abstention,
top-5, both embeddings for drift) and a SHA-256 of the cleaned inputs, never the raw text. Writing is
asynchronous: :class:`PredictionLogWriter` buffers rows in memory and flushes them from a background
thread, so logging never slows or fails a request; when S3 is down, files wait in a local spool
directory and are uploaded once it is back, also by the next replica if this one stops first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lib.data.layout import PREDICTIONS, prediction_day_of, prediction_day_prefix, prediction_key
from lib.data.storage import get_bytes, list_keys, list_prefixes
from lib.settings import Settings

TOP_K = 5
COLUMNS = [
    "timestamp", "model_name", "model_version", "has_text", "has_image", "prdtypecode", "confidence",
    "abstained", "top5_codes", "top5_scores", "text_emb", "image_emb", "input_hash", "latency_ms",
    "batch_size",
]  # fmt: skip

# A spooled file is named by its object key with "/" replaced (one flat directory, the key recoverable).
SPOOL_SEPARATOR = "~"

logger = logging.getLogger(__name__)


def input_hash(designation: str, description: str, image: bytes | None) -> str:
    """SHA-256 of the cleaned text fields and the image bytes (identifies an input without storing it)."""
    digest = hashlib.sha256()
    digest.update(designation.encode())
    digest.update(b"\x1f")
    digest.update(description.encode())
    digest.update(b"\x1f")
    digest.update(image or b"")
    return digest.hexdigest()


def log_row(
    prediction: dict,
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    has_text: bool,
    has_image: bool,
    hash_hex: str,
    timestamp: datetime | None = None,
    latency_ms: float | None = None,
    batch_size: int | None = None,
) -> dict:
    """One log row from a served prediction and its inputs.

    ``prediction`` holds ``prdtypecode``, ``confidence``, ``abstained``, ``model_name``,
    ``model_version`` and ``top5`` (a list of ``{"prdtypecode", "score", ...}``). ``latency_ms``: from the
    request's parsing to this answer; ``batch_size``: products in the model's batch.
    """
    top = prediction["top5"]
    return {
        "timestamp": timestamp or datetime.now(UTC),
        "latency_ms": latency_ms,
        "batch_size": batch_size,
        "model_name": prediction["model_name"],
        "model_version": str(prediction["model_version"]),
        "has_text": bool(has_text),
        "has_image": bool(has_image),
        "prdtypecode": int(prediction["prdtypecode"]),
        "confidence": float(prediction["confidence"]),
        "abstained": bool(prediction["abstained"]),
        "top5_codes": [int(t["prdtypecode"]) for t in top],
        "top5_scores": [float(t["score"]) for t in top],
        "text_emb": np.asarray(text_emb, np.float32),
        "image_emb": np.asarray(image_emb, np.float32),
        "input_hash": hash_hex,
    }


def _vectors(rows: list[dict], column: str) -> pa.Array:
    matrix = np.stack([r[column] for r in rows]).astype(np.float32, copy=False)  # (n, dim)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Log rows (same embedding sizes) → an Arrow table with the log schema."""
    return pa.table(
        {
            "timestamp": pa.array([r["timestamp"] for r in rows], pa.timestamp("us", tz="UTC")),
            "model_name": pa.array([r["model_name"] for r in rows], pa.string()),
            "model_version": pa.array([r["model_version"] for r in rows], pa.string()),
            "has_text": pa.array([r["has_text"] for r in rows], pa.bool_()),
            "has_image": pa.array([r["has_image"] for r in rows], pa.bool_()),
            "prdtypecode": pa.array([r["prdtypecode"] for r in rows], pa.int64()),
            "confidence": pa.array([r["confidence"] for r in rows], pa.float32()),
            "abstained": pa.array([r["abstained"] for r in rows], pa.bool_()),
            "top5_codes": pa.array([r["top5_codes"] for r in rows], pa.list_(pa.int64())),
            "top5_scores": pa.array([r["top5_scores"] for r in rows], pa.list_(pa.float32())),
            "text_emb": _vectors(rows, "text_emb"),
            "image_emb": _vectors(rows, "image_emb"),
            "input_hash": pa.array([r["input_hash"] for r in rows], pa.string()),
            "latency_ms": pa.array([r.get("latency_ms") for r in rows], pa.float32()),
            "batch_size": pa.array([r.get("batch_size") for r in rows], pa.int32()),
        }
    )


def group_rows(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (UTC date, text dim, image dim): each group becomes one file."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["timestamp"].astimezone(UTC).date(), len(row["text_emb"]), len(row["image_emb"]))
        groups.setdefault(key, []).append(row)
    return groups


def read_predictions(
    client, settings: Settings, since: datetime | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """Logged predictions at or after ``since`` (UTC; all when None), oldest first."""
    wanted = list(columns) if columns is not None else list(COLUMNS)
    read_columns = wanted if "timestamp" in wanted else ["timestamp", *wanted]
    since_utc = None
    if since is not None:  # naive datetimes are taken as UTC
        since_utc = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    first_day = prediction_day_of(prediction_day_prefix(since_utc)) if since_utc is not None else ""
    prefixes = [
        p
        for p in list_prefixes(client, settings.bucket_lake, PREDICTIONS)
        if prediction_day_of(p) >= first_day
    ]
    keys = [k for p in prefixes for k in list_keys(client, settings.bucket_lake, p) if k.endswith(".parquet")]
    if not keys:
        return pd.DataFrame(columns=wanted)
    with ThreadPoolExecutor(settings.upload_threads) as pool:
        tables = list(pool.map(lambda k: _read_log_file(client, settings.bucket_lake, k, read_columns), keys))
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    if since_utc is not None:
        frame = frame[frame["timestamp"] >= pd.Timestamp(since_utc)]
    # A file written before a column existed (latency_ms, batch_size) has nulls there.
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True).reindex(columns=wanted)


def _read_log_file(client, bucket: str, key: str, columns: list[str]) -> pa.Table:
    """The ``columns`` of one log file that it has."""
    parquet = pq.ParquetFile(io.BytesIO(get_bytes(client, bucket, key)))
    return parquet.read([c for c in columns if c in parquet.schema_arrow.names])


class PredictionLogWriter:
    """Buffers log rows and writes them from a background thread (every ``flush_rows`` or ``flush_s``).

    ``write(key, table)`` stores one file. :meth:`add` only appends under a lock: it never blocks on I/O
    and never raises. A file the store refuses (S3 down) goes to the local ``spool`` directory instead,
    under its object key, and is uploaded when the store is back, by this writer or by the next one that
    uses the spool (a stopped or replaced replica loses nothing). Without a spool, or when the disk
    refuses too, rows wait in memory, and beyond ``max_buffer_rows`` the oldest are dropped and counted
    in :attr:`dropped`.
    """

    def __init__(
        self,
        write: Callable[[str, pa.Table], None],
        flush_rows: int,
        flush_s: float,
        max_buffer_rows: int,
        spool: Path | None = None,
    ) -> None:
        self._write = write
        self.flush_rows = max(1, flush_rows)
        self.flush_s = flush_s
        self.max_buffer_rows = max(self.flush_rows, max_buffer_rows)
        self.spool = spool
        self._rows: deque[dict] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._rows)

    def add(self, rows: Iterable[dict]) -> None:
        """Queue rows for writing (cheap; safe from any thread)."""
        with self._lock:
            self._rows.extend(rows)
            if self.spool is None:  # with a spool the flusher drains the buffer to disk instead
                self._trim()
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def _trim(self) -> None:
        """Drop the oldest rows beyond the bound (caller holds the lock)."""
        while len(self._rows) > self.max_buffer_rows:
            self._rows.popleft()
            self.dropped += 1

    def flush(self) -> int:
        """Upload spooled files, then write every buffered row (files of at most ``flush_rows``) to the
        store, or to the spool when the store fails; returns the rows that reached the store."""
        written = 0
        with self._flush_lock:
            store_up = self._upload_spool()
            while True:
                with self._lock:
                    chunk = [self._rows.popleft() for _ in range(min(self.flush_rows, len(self._rows)))]
                if not chunk:
                    return written
                groups = list(group_rows(chunk).values())
                for i, rows in enumerate(groups):
                    key, table = prediction_key(rows[0]["timestamp"]), rows_to_table(rows)
                    try:
                        if not store_up:
                            raise ConnectionError(self.last_error or "the store is down")
                        self._write(key, table)
                        written += len(rows)
                        self.written += len(rows)
                    except Exception as exc:  # S3 down, network...: spool the file, or keep the rows
                        store_up = False
                        if not self._spool_file(key, table, exc):
                            self._requeue([r for g in groups[i:] for r in g])
                            return written

    def _spool_file(self, key: str, table: pa.Table, exc: Exception) -> bool:
        """Keep one refused file on local disk; False when there is no spool or the disk refuses too."""
        self._note_failure(exc)
        if self.spool is None:
            return False
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            partial = self.spool / f".{uuid.uuid4().hex}.tmp"
            pq.write_table(table, partial)
            partial.rename(self.spool / key.replace("/", SPOOL_SEPARATOR))  # complete files only
        except OSError as disk:
            self._note_failure(disk)
            return False
        self.spooled += table.num_rows
        return True

    def _upload_spool(self) -> bool:
        """Upload spooled files, oldest first, each deleted once stored; False if the store refused one."""
        for path in self._spooled_files():
            try:
                table = pq.read_table(path)
                self._write(path.name.replace(SPOOL_SEPARATOR, "/"), table)
            except FileNotFoundError:  # another replica's writer uploaded it first
                continue
            except Exception as exc:
                self._note_failure(exc)
                return False
            path.unlink(missing_ok=True)
            self.written += table.num_rows
        return True

    def _spooled_files(self) -> list[Path]:
        """Complete spooled files, oldest first (every writer sharing the spool sees them)."""
        if self.spool is None or not self.spool.is_dir():
            return []
        files = []
        for path in self.spool.glob(f"*{SPOOL_SEPARATOR}*.parquet"):
            with contextlib.suppress(FileNotFoundError):  # uploaded meanwhile by another writer
                files.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(files)]

    def _requeue(self, rows: list[dict]) -> None:
        with self._lock:
            self._rows.extendleft(reversed(rows))
            self._trim()
        logger.warning("prediction log: write failed (%s); %d rows kept", self.last_error, self.pending)

    def _note_failure(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()
        self.flush()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the background thread after a last flush (to the store or the spool; waits at most
        ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def stats(self) -> dict:
        return {
            "written": self.written,
            "pending": self.pending,
            "spooled": self.spooled,
            "spool_files": len(list(self.spool.glob("*.parquet")))
            if self.spool and self.spool.is_dir()
            else 0,
            "dropped": self.dropped,
            "failures": self.failures,
            "last_error": self.last_error,
        }
