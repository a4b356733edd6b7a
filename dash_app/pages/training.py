"""Training: production/previous models, F1 over runs, best hyperparameters, per-class F1, confusion matrix
and ablation."""

from __future__ import annotations

import base64
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, dcc, html

from dash_app import components as ui
from dash_app import figures
from dash_app.data import DataSource, ModelInfo, RunDetails, Unavailable
from lib.settings import Settings

PATH = "/training"
TITLE = "Training"
NO_RUN = (
    "No training run yet. Ingest and embed a labelled batch, then `python -m jobs.train` "
    "(the pipeline does it)."
)


def layout(settings: Settings) -> html.Div:
    return html.Div(
        [
            html.H2("Training"),
            html.P(
                f"Models in the registry ({settings.registered_model_name}) and the runs of "
                f"MLflow experiment {settings.mlflow_experiment}.",
                className="lead",
            ),
            dcc.Store(id="training-init", data=True),
            dcc.Loading(html.Div(id="training-summary")),
            ui.section(
                "Run details",
                dcc.Dropdown(
                    id="training-run", options=[], placeholder="Choose a training run", clearable=False
                ),
                dcc.Loading(html.Div(id="training-run-details")),
            ),
        ]
    )


def model_panel(model: ModelInfo | None, alias: str) -> html.Div:
    """One aliased model version: scores, date, data batches, code version."""
    if model is None:
        message = (
            "No production model yet: the first successful training run is promoted."
            if alias == "production"
            else "No previous model (set when a newer model is promoted)."
        )
        return ui.section(f"@{alias}", ui.notice(message, kind="muted"), className="model")
    rows = [
        ("version", html.Strong(f"v{model.version}")),
        ("test F1-macro", ui.fmt_float(model.test_f1_macro)),
        ("test weighted F1", ui.fmt_float(model.test_f1_weighted)),
        ("registered", ui.fmt_time(model.created)),
        ("data batches", ", ".join(model.batch_ids) or "—"),
        ("git sha", html.Code((model.git_sha or "—")[:19])),
        ("encoder set", html.Code(model.encoder_set_id or "—")),
    ]
    return ui.section(f"@{alias}", ui.kv_table(rows), className="model")


def run_label(row: pd.Series) -> str:
    version = f" · v{row['version']}" if isinstance(row.get("version"), str) else ""
    f1 = f" · F1 {row['test_f1_macro']:.4f}" if pd.notna(row.get("test_f1_macro")) else f" · {row['status']}"
    retune = f" · {row['retune']}" if isinstance(row.get("retune"), str) else ""
    return f"{ui.fmt_time(row['start'])}{version}{f1}{retune}"


def render_summary(production: ModelInfo | None, previous: ModelInfo | None, runs: pd.DataFrame) -> Any:
    """The two aliased models and the F1 history (or what to do when nothing was trained)."""
    models = html.Div(
        [model_panel(production, "production"), model_panel(previous, "previous")], className="grid-2"
    )
    if runs.empty:
        return html.Div([models, ui.notice(NO_RUN, "No training runs")])
    history = figures.f1_history_figure(runs, production.test_f1_macro if production else None)
    return html.Div([models, ui.section("F1 over training runs", ui.graph(history))])


def run_options(runs: pd.DataFrame) -> list[dict]:
    return [{"label": run_label(row), "value": row["run_id"]} for _, row in runs.iloc[::-1].iterrows()]


def fmt_param(value: str) -> str:
    """MLflow params are strings: shorten long floats (0.002160082074140205 → 0.00216)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.3g}"


def render_run(details: RunDetails) -> Any:
    """Best hyperparameters, per-class F1, confusion matrix and ablation of one run."""
    params = details.best_params
    params_panel = (
        ui.kv_table([(k, fmt_param(v)) for k, v in params.items()])
        if params
        else ui.notice("This run logged no best_* parameters (it may still be running).", kind="muted")
    )
    metrics = [
        (name, ui.fmt_float(details.metrics.get(key)))
        for name, key in (
            ("test F1-macro", "test_f1_macro"),
            ("test weighted F1", "test_f1_weighted"),
            ("test accuracy", "test_accuracy"),
            ("best val F1-macro", "best_val_f1_macro"),
            ("tuning seconds", "tune_seconds"),
        )
        if key in details.metrics
    ]
    if "retune" in details.params:  # the retune policy's decision (lib.model.stage.decide_retune)
        metrics.append(("search", f"{details.params['retune']}: {details.params.get('retune_reason', '')}"))
    confusion = (
        html.Img(
            src="data:image/png;base64," + base64.b64encode(details.confusion_png).decode(),
            alt="confusion matrix",
            className="confusion",
        )
        if details.confusion_png
        else ui.notice("No confusion matrix logged for this run.", kind="muted")
    )
    return html.Div(
        [
            html.Div(
                [
                    ui.section("Best trial's hyperparameters", params_panel),
                    ui.section(
                        "Scores",
                        ui.kv_table(metrics) if metrics else ui.notice("No score yet.", kind="muted"),
                    ),
                    ui.section("Ablation", ui.graph(figures.ablation_figure(details.ablation))),
                ],
                className="grid-3",
            ),
            html.Div(
                [
                    ui.section("Per-class F1", ui.graph(figures.per_class_f1_figure(details.per_class))),
                    ui.section("Confusion matrix", confusion),
                ],
                className="grid-2",
            ),
            html.P(f"MLflow run {details.run_id}", className="hint"),
        ]
    )


def summary_content(data: DataSource) -> tuple[Any, list[dict], str | None]:
    """Summary children, run picker options and its default (production's run, else the newest)."""
    try:
        production, previous = data.model("production"), data.model("previous")
        runs = data.runs()
    except Unavailable as err:
        return ui.notice(str(err), "Training data unavailable", "error"), [], None
    options = run_options(runs)
    default = production.run_id if production and production.run_id in set(runs["run_id"]) else None
    return (
        render_summary(production, previous, runs),
        options,
        default or (options[0]["value"] if options else None),
    )


def run_content(data: DataSource, run_id: str | None) -> Any:
    if not run_id:
        return ui.notice("No run to show.", kind="muted")
    try:
        return render_run(data.run_details(run_id))
    except Unavailable as err:
        return ui.notice(str(err), kind="error")


def register(app: Dash, data: DataSource) -> None:
    @app.callback(
        Output("training-summary", "children"),
        Output("training-run", "options"),
        Output("training-run", "value"),
        Input("training-init", "data"),
    )
    @ui.safe(3)
    def _summary(_init: Any) -> tuple:
        return summary_content(data)

    @app.callback(Output("training-run-details", "children"), Input("training-run", "value"))
    @ui.safe(1)
    def _run(run_id: str | None) -> Any:
        return run_content(data, run_id)
