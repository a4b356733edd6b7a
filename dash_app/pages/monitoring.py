"""Monitoring: prediction volume and confidence, class mix vs training, abstentions, drift, recent rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, dcc, html

from dash_app import components as ui
from dash_app import figures
from dash_app.data import DataSource, Unavailable
from lib.data.layout import MONITORING, REPORT_JSON_FILE
from lib.data.rakuten import class_name
from lib.settings import Settings

PATH = "/monitoring"
TITLE = "Monitoring"
WINDOWS = {
    "1h": ("last hour", timedelta(hours=1)),
    "24h": ("last 24 hours", timedelta(days=1)),
    "7d": ("last 7 days", timedelta(days=7)),
    "30d": ("last 30 days", timedelta(days=30)),
}
DEFAULT_WINDOW = "24h"
ALL_VERSIONS = "all"


def layout(settings: Settings) -> html.Div:
    controls = html.Div(
        [
            html.Div(
                [
                    html.Label("Time window", htmlFor="monitoring-window"),
                    dcc.Dropdown(
                        id="monitoring-window",
                        options=[{"label": label, "value": key} for key, (label, _) in WINDOWS.items()],
                        value=DEFAULT_WINDOW,
                        clearable=False,
                    ),
                ],
                className="control",
            ),
            html.Div(
                [
                    html.Label("Model version", htmlFor="monitoring-version"),
                    dcc.Dropdown(
                        id="monitoring-version",
                        options=[{"label": "all versions", "value": ALL_VERSIONS}],
                        value=ALL_VERSIONS,
                        clearable=False,
                    ),
                ],
                className="control",
            ),
            html.Div(
                f"refreshes every {settings.dash_refresh_s:g} s",
                className="hint refresh",
                id="monitoring-clock",
            ),
        ],
        className="controls card",
    )
    return html.Div(
        [
            html.H2("Monitoring"),
            html.P(
                "Predictions logged by the prediction service and the latest drift report.", className="lead"
            ),
            controls,
            dcc.Interval(id="monitoring-interval", interval=int(settings.dash_refresh_s * 1000)),
            html.Div(id="monitoring-content"),
        ]
    )


def version_options(predictions: pd.DataFrame) -> list[dict]:
    versions = (
        sorted(predictions["model_version"].dropna().unique(), key=_version_key)
        if not predictions.empty
        else []
    )
    return [{"label": "all versions", "value": ALL_VERSIONS}] + [
        {"label": f"v{v}", "value": v} for v in versions
    ]


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if str(version).isdigit() else (1, 0, str(version))


def filter_version(predictions: pd.DataFrame, version: str | None) -> pd.DataFrame:
    if not version or version == ALL_VERSIONS or predictions.empty:
        return predictions
    return predictions[predictions["model_version"] == version]


def render_kpis(predictions: pd.DataFrame) -> html.Div:
    if predictions.empty:
        return ui.stats_row([ui.stat("predictions", 0)])
    abstain_rate = predictions["abstained"].mean() if "abstained" in predictions else float("nan")
    with_image = predictions["has_image"].mean() if "has_image" in predictions else float("nan")
    return ui.stats_row(
        [
            ui.stat("predictions", f"{len(predictions):,}"),
            ui.stat("mean confidence", f"{predictions['confidence'].mean():.1%}"),
            ui.stat("abstain rate", f"{abstain_rate:.1%}"),
            ui.stat("with image", f"{with_image:.1%}"),
            ui.stat(
                "last prediction",
                f"{predictions['timestamp'].max():%H:%M} UTC",
                f"{predictions['timestamp'].max():%Y-%m-%d}",
            ),
        ]
    )


def _time(value: Any) -> str:
    try:
        return ui.fmt_time(pd.Timestamp(value)) if value else "—"
    except (ValueError, TypeError):
        return str(value)


def describe_window(window: Any) -> str:
    """A report's window, whatever its shape: hours, a string, or a {start, end} / {hours} mapping."""
    if isinstance(window, dict):
        if "start" in window or "end" in window:
            return f"{_time(window.get('start'))} → {_time(window.get('end'))}"
        return ", ".join(f"{k} {v}" for k, v in window.items())
    if isinstance(window, int | float):
        return f"{window:g} h"
    return str(window) if window else "—"


def render_drift(report: dict | None) -> Any:
    """The latest drift report: overall verdict and one row per signal."""
    if not report:
        return ui.notice(
            "No drift report yet. The monitor writes one to the lake "
            f"({MONITORING}<time>/{REPORT_JSON_FILE}) on its schedule once predictions are logged.",
            kind="muted",
        )
    drifted = bool(report.get("drifted"))
    signals = report.get("signals") or []
    verdict = report.get("verdict") or ("drift" if drifted else "ok")
    badge = (
        ui.badge("drift detected", "bad")
        if drifted
        else ui.badge("no drift", "good")
        if verdict == "ok"
        else ui.badge(verdict, "neutral")  # e.g. "not enough data"
    )
    window = report.get("window", report.get("window_hours"))
    facts = [
        f"created {_time(report.get('created_at'))}",
        f"window {describe_window(window)}",
        f"model v{report.get('model_version', '?')}",
    ]
    if report.get("predictions") is not None:
        facts.append(f"{report['predictions']:,} predictions")
    head = html.Div([badge, html.Span(" " + " · ".join(facts), className="hint")], className="drift-head")
    if not signals:
        return html.Div([head, ui.notice(f"The report has no signals ({verdict}).", kind="muted")])
    rows = [
        html.Tr(
            [
                html.Td(s.get("name")),
                html.Td(ui.fmt_float(s.get("value"))),
                html.Td(ui.fmt_float(s.get("threshold"))),
                html.Td(
                    ui.badge("no verdict", "neutral")
                    if s.get("value") is None
                    else ui.badge("drifted", "bad")
                    if s.get("drifted")
                    else ui.badge("ok", "good")
                ),
                html.Td(str(s.get("detail") or ""), className="detail"),
            ]
        )
        for s in signals
    ]
    table = html.Table(
        [
            html.Thead(html.Tr([html.Th(c) for c in ("signal", "value", "threshold", "status", "detail")])),
            html.Tbody(rows),
        ],
        className="table",
        id="drift-signals",
    )
    return html.Div([head, table])


def recent_table(predictions: pd.DataFrame, rows: int) -> Any:
    if predictions.empty:
        return ui.notice("No prediction in this window.", kind="muted")
    recent = predictions.tail(rows).iloc[::-1]
    frame = pd.DataFrame(
        {
            "time": recent["timestamp"].map(ui.fmt_time),
            "model": "v" + recent["model_version"].astype(str),
            "class": [f"{c} · {class_name(c)}" for c in recent["prdtypecode"]],
            "confidence": recent["confidence"].map(lambda v: f"{v:.1%}"),
            "abstained": recent["abstained"].map({True: "yes", False: ""}),
            "inputs": [
                " + ".join(n for n, f in (("text", t), ("image", i)) if f)
                for t, i in zip(recent.get("has_text", []), recent.get("has_image", []), strict=True)
            ],
            "input": recent["input_hash"].astype(str).str.slice(0, 12) if "input_hash" in recent else "",
        }
    )
    return html.Div(ui.frame_table(frame), id="recent-predictions", className="scroll")


def render_monitoring(
    predictions: pd.DataFrame,
    window: timedelta,
    training_counts: dict[int, int],
    drift: Any,
    recent_rows: int,
) -> html.Div:
    """Everything below the filters, for predictions already filtered by window and version."""
    if predictions.empty:
        body: list[Any] = [
            ui.notice(
                "No prediction logged in this window. Use the Predict page or POST to the prediction "
                "service's /predict; logged predictions appear here within seconds.",
                "No predictions",
            )
        ]
    else:
        body = [
            render_kpis(predictions),
            html.Div(
                [
                    ui.section(
                        "Volume and confidence",
                        ui.graph(figures.predictions_timeline_figure(predictions, window)),
                    ),
                    ui.section(
                        "Confidence and abstentions",
                        ui.graph(figures.confidence_histogram_figure(predictions)),
                    ),
                ],
                className="grid-2",
            ),
            ui.section(
                "Serving: throughput, latency and batch size",
                ui.graph(figures.serving_figure(predictions, window)),
                html.P(
                    "Latency is measured from the parsed request to the model's answer; the batch is "
                    "the fusion head's. Ray's metrics endpoint exports the same as "
                    "ray_rakuten_requests, ray_rakuten_request_latency_ms and ray_rakuten_model_batch_size.",
                    className="hint",
                ),
            ),
            ui.section(
                "Class mix",
                ui.graph(figures.class_mix_figure(predictions["prdtypecode"], training_counts)),
                None
                if training_counts
                else html.P("The production model's training class mix is not available.", className="hint"),
            ),
        ]
    body.append(ui.section("Latest drift report", drift))
    body.append(ui.section("Recent predictions", recent_table(predictions, recent_rows)))
    return html.Div(body)


def monitoring_content(
    data: DataSource, window_key: str | None, version: str | None
) -> tuple[Any, list[dict]]:
    """Content children and the version picker's options."""
    window = WINDOWS.get(window_key or DEFAULT_WINDOW, WINDOWS[DEFAULT_WINDOW])[1]
    try:
        predictions = data.predictions(window)
    except Unavailable as err:
        return ui.notice(str(err), "Monitoring unavailable", "error"), version_options(pd.DataFrame())
    try:
        drift = render_drift(data.drift_report())
    except Unavailable as err:
        drift = ui.notice(str(err), kind="error")
    try:
        training_counts = data.training_class_counts()
    except Unavailable:
        training_counts = {}  # MLflow down: the chart shows the predictions alone
    shown = filter_version(predictions, version)
    content = render_monitoring(shown, window, training_counts, drift, data.settings.dash_recent_predictions)
    return content, version_options(predictions)


def register(app: Dash, data: DataSource) -> None:
    @app.callback(
        Output("monitoring-content", "children"),
        Output("monitoring-version", "options"),
        Input("monitoring-window", "value"),
        Input("monitoring-version", "value"),
        Input("monitoring-interval", "n_intervals"),
    )
    @ui.safe(2)
    def _refresh(window_key: str, version: str, _ticks: int | None) -> tuple:
        return monitoring_content(data, window_key, version)
