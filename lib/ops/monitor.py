"""Drift monitoring: recent predictions against the production model's training reference.

``run_monitor`` writes a report under ``lib.data.layout.monitoring_prefix`` (JSON + a small HTML page)
and logs its signals to MLflow (experiment ``<experiment>-monitoring``); ``jobs/monitor.py`` is its CLI.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from lib.data.layout import REPORT_HTML_FILE, REPORT_JSON_FILE, monitoring_prefix
from lib.data.storage import put_bytes, put_json, s3_client
from lib.model import registry
from lib.model.artifact import LoadedModel
from lib.model.dataset import Dataset, load_dataset
from lib.model.split import TEST, TRAIN
from lib.ops import drift
from lib.ops.predlog import read_predictions
from lib.settings import Settings


def build_report(
    settings: Settings, predictions: pd.DataFrame, data: Dataset, loaded: LoadedModel, window_hours: float
) -> dict:
    """The drift signals (pure given its inputs): predictions vs the training split and the test behaviour."""
    signals: list[drift.Signal] = []
    n = len(predictions)
    if n >= settings.monitor_min_rows:
        train_mask = data.split == TRAIN
        codes = np.array(data.codes)
        reference_counts = {int(c): int((codes[data.y[train_mask]] == c).sum()) for c in data.codes}
        signals += drift.class_mix_signals(
            reference_counts,
            predictions["prdtypecode"].to_numpy(),
            settings.drift_psi_threshold,
            settings.drift_chi2_alpha,
        )
        for modality, flag, ref in (("text", "has_text", data.text), ("image", "has_image", data.image)):
            ref_rows = ref[train_mask & (np.abs(ref).sum(1) > 0)]
            rows = predictions[predictions[flag]][f"{modality}_emb"]
            recent = np.stack(rows.to_numpy()) if len(rows) else np.zeros((0, ref.shape[1]), np.float32)
            signals.append(
                drift.embedding_signal(
                    f"{modality}_embedding_auc",
                    drift.sample_rows(ref_rows, settings.monitor_max_rows),
                    drift.sample_rows(recent, settings.monitor_max_rows),
                    settings.drift_auc_threshold,
                    settings.monitor_min_rows,
                )
            )
        text, image, _ = data.part(TEST)
        reference_conf = loaded.probabilities(text, image, data.texts_part(TEST)).max(1)
        signals += drift.confidence_signals(
            reference_conf,
            predictions["confidence"].to_numpy(np.float64),
            settings.abstain_threshold,
            settings.drift_confidence_drop,
            settings.drift_abstain_increase,
        )
    return {
        "created_at": datetime.now(UTC).isoformat(),
        "window_hours": window_hours,
        "model_version": loaded.version,
        "predictions": n,
        "model_versions_seen": sorted(predictions["model_version"].astype(str).unique().tolist())
        if n
        else [],
        "verdict": "drift" if any(s.drifted for s in signals) else ("ok" if signals else "not enough data"),
        "drifted": any(s.drifted for s in signals),
        "signals": [s.to_dict() for s in signals],
    }


def report_html(report: dict) -> str:
    """A small self-contained HTML page of the report (the dashboard has the charts)."""

    def row(s: dict) -> str:
        value = "" if s["value"] is None else f"{s['value']:.4g}"
        colour = "#fde2e1" if s["drifted"] else "#e3f6e5"
        return (
            f"<tr style='background:{colour}'><td>{html.escape(s['name'])}</td><td>{value}</td>"
            f"<td>{s['threshold']}</td><td>{'DRIFT' if s['drifted'] else 'ok'}</td>"
            f"<td>{html.escape(s['detail'])}</td></tr>"
        )

    rows = "".join(row(s) for s in report["signals"])
    return (
        "<!doctype html><meta charset='utf-8'><title>Drift report</title>"
        "<style>body{font-family:sans-serif;margin:2em}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style>"
        f"<h1>Drift report — {html.escape(report['verdict'])}</h1>"
        f"<p>{report['created_at']} · model v{report['model_version']} · {report['predictions']} predictions "
        f"in the last {report['window_hours']:g} h</p>"
        f"<table><tr><th>signal</th><th>value</th><th>threshold</th><th>status</th><th>detail</th></tr>{rows}</table>"
    )


def run_monitor(settings: Settings, window_hours: float | None = None) -> dict:
    """The monitor stage; returns the report (also written to S3 and MLflow)."""
    window_hours = window_hours or settings.monitor_window_hours
    client = s3_client(settings)
    registry_client = MlflowClient(settings.mlflow_uri)
    production = registry.version_by_alias(
        registry_client, settings.registered_model_name, registry.PRODUCTION
    )
    if production is None:
        return {"verdict": "no production model", "signals": [], "drifted": False}
    loaded = registry.load_version(registry_client, settings.registered_model_name, production.version)
    since = datetime.now(UTC) - timedelta(hours=window_hours)
    predictions = read_predictions(
        client,
        settings,
        since,
        ["model_version", "prdtypecode", "confidence", "has_text", "has_image", "text_emb", "image_emb"],
    )
    # The production model carries its own TF-IDF block: the monitor needs the texts, not a new fit.
    data, _ = load_dataset(client, settings.model_copy(update={"lexical_enabled": False}))
    report = build_report(settings, predictions, data, loaded, window_hours)

    prefix = monitoring_prefix(datetime.now(UTC))
    html_page = report_html(report).encode()
    put_bytes(client, settings.bucket_lake, f"{prefix}{REPORT_HTML_FILE}", html_page, "text/html")
    # Last: the dashboard reads the JSON, so a report is visible only once complete.
    put_json(client, settings.bucket_lake, f"{prefix}{REPORT_JSON_FILE}", report)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_experiment(f"{settings.mlflow_experiment}-monitoring")
    with mlflow.start_run(run_name=f"drift-v{production.version}"):
        mlflow.set_tags({"verdict": report["verdict"], "model_version": production.version})
        mlflow.log_metrics(
            {s["name"]: s["value"] for s in report["signals"] if s["value"] is not None}
            | {"predictions": report["predictions"], "drifted": float(report["drifted"])}
        )
        mlflow.log_dict(report, "report.json")
        mlflow.log_text(report_html(report), "report.html")
    return {**report, "s3_prefix": f"s3://{settings.bucket_lake}/{prefix}"}
