"""Drift monitoring: recent predictions against the production model's training reference.

``python -m jobs.monitor [--window 24h]``: writes ``lake/monitoring/<UTC timestamp>/report.{json,html}``
and logs the signals to MLflow (experiment ``<experiment>-monitoring``).
"""

from __future__ import annotations

import argparse
import html
import re
from datetime import UTC, datetime, timedelta

import numpy as np

from lib import drift, registry
from lib.predlog import read_predictions
from lib.settings import Settings, get_settings
from lib.split import TEST, TRAIN
from lib.storage import put_bytes, put_json, s3_client
from lib.train import softmax

MONITORING = "monitoring/"


def parse_window(text: str) -> float:
    """``24h`` / ``90m`` / ``2d`` / ``6`` (hours) → hours."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"window must look like 24h, 90m or 2d, not {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "h"
    return value * {"m": 1 / 60, "h": 1, "d": 24}[unit]


def build_report(
    settings: Settings, predictions, data, loaded: registry.LoadedModel, window_hours: float
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
        logits = loaded.logits(text, image, data.texts_part(TEST))
        reference_conf = softmax(logits, loaded.card.get("temperature", 1.0)).max(1)
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


def run(settings: Settings | None = None, window_hours: float | None = None) -> dict:
    """The monitor stage; returns the report (also written to S3 and MLflow)."""
    import mlflow
    from mlflow import MlflowClient

    from jobs.train import load_dataset

    settings = settings or get_settings()
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
    data, _ = load_dataset(settings.model_copy(update={"lexical_enabled": False}), client)
    report = build_report(settings, predictions, data, loaded, window_hours)

    prefix = f"{MONITORING}{datetime.now(UTC):%Y%m%dT%H%M%SZ}/"
    put_bytes(client, settings.bucket_lake, f"{prefix}report.html", report_html(report).encode(), "text/html")
    put_json(client, settings.bucket_lake, f"{prefix}report.json", report)  # last: the dashboard reads JSON
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=parse_window, default=None, help="e.g. 24h, 90m, 2d")
    args = parser.parse_args(argv)
    report = run(window_hours=args.window)
    print(f"drift report: {report['verdict']} ({report.get('predictions', 0)} predictions)")
    for s in report["signals"]:
        value = "-" if s["value"] is None else f"{s['value']:.4g}"
        print(
            f"  {s['name']:24s} {value:>8} (threshold {s['threshold']}) {'DRIFT' if s['drifted'] else 'ok'}"
        )
    if "s3_prefix" in report:
        print(f"report: {report['s3_prefix']}report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
