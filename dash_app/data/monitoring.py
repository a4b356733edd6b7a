"""Monitoring reads: the prediction log of a recent window and the newest drift report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from dash_app.data.services import Services
from lib.data import lake
from lib.ops.predlog import read_predictions

# Prediction columns the monitoring page needs (the embeddings stay in the lake).
PREDICTION_COLUMNS = [
    "timestamp", "model_version", "has_text", "has_image", "prdtypecode", "confidence", "abstained",
    "input_hash", "latency_ms", "batch_size",
]  # fmt: skip
# Epoch timestamps above this are in milliseconds (1e11 s is the year 5138).
EPOCH_MS_THRESHOLD = 1e11


def normalise_timestamps(column: pd.Series) -> pd.Series:
    """Timestamps as UTC datetimes, whether stored as datetimes, ISO strings or epoch seconds/ms."""
    if pd.api.types.is_numeric_dtype(column):
        unit = "ms" if column.dropna().abs().max() > EPOCH_MS_THRESHOLD else "s"
        return pd.to_datetime(column, unit=unit, utc=True)
    return pd.to_datetime(column, utc=True, errors="coerce", format="mixed")


def tidy_predictions(frame: pd.DataFrame, since: datetime, max_rows: int) -> pd.DataFrame:
    """Predictions since ``since``, newest last, at most ``max_rows`` (the newest), with tidy dtypes."""
    if frame.empty or "timestamp" not in frame:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    frame = frame.copy()
    frame["timestamp"] = normalise_timestamps(frame["timestamp"])
    frame = frame[frame["timestamp"] >= pd.Timestamp(since)].sort_values("timestamp", kind="stable")
    frame = frame.tail(max_rows).reset_index(drop=True)
    if "model_version" in frame:
        frame["model_version"] = frame["model_version"].astype("string").fillna("?")
    for flag in ("abstained", "has_text", "has_image"):
        if flag in frame:
            frame[flag] = frame[flag].fillna(False).astype(bool)
    return frame


class MonitoringReader:
    """The prediction log and the drift reports in the lake."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    def predictions(self, window: timedelta) -> pd.DataFrame:
        """Logged predictions of the last ``window`` (scalar columns only, newest rows; cached)."""
        return self.services.cached(
            ("predictions", window.total_seconds()),
            "s3",
            "the prediction log",
            lambda: self._predictions(window),
        )

    def _predictions(self, window: timedelta) -> pd.DataFrame:
        since = datetime.now(UTC) - window
        frame = read_predictions(self.services.s3, self.settings, since, PREDICTION_COLUMNS)
        return tidy_predictions(frame, since, self.settings.dash_max_prediction_rows)

    def drift_report(self) -> dict | None:
        """The newest complete drift report (its JSON plus ``key``), or None."""
        return self.services.cached(("drift",), "s3", "drift reports", self._drift_report)

    def _drift_report(self) -> dict | None:
        return lake.latest_drift_report(self.services.s3, self.settings)
