"""Predict: a product form → the Serve endpoint → class, confidence, top-5 and similar catalogue products."""

from __future__ import annotations

from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html

from dash_app import components as ui
from dash_app import figures
from dash_app.data import DataSource, Unavailable, decode_upload
from lib.data.images import image_problem
from lib.data.rakuten import class_name
from lib.settings import Settings

PATH = "/"
TITLE = "Predict"


def layout(settings: Settings) -> html.Div:
    """The form and the (initially empty) result areas."""
    form = ui.section(
        "Product",
        html.Label("Title (designation)", htmlFor="predict-designation"),
        dcc.Input(id="predict-designation", type="text", placeholder="e.g. Chaise de jardin pliante en teck"),
        html.Label("Description", htmlFor="predict-description"),
        dcc.Textarea(id="predict-description", placeholder="optional", rows=4),
        html.Label("Image"),
        dcc.Upload(
            id="predict-image",
            children=html.Div(["Drop an image here or ", html.A("choose a file")]),
            accept="image/*",
            max_size=settings.max_image_bytes,
            multiple=False,
            className="upload",
        ),
        html.Div(f"JPEG or PNG, up to {settings.max_image_bytes / 1e6:g} MB.", className="hint"),
        html.Div(id="predict-preview", className="preview"),
        html.Button("Predict", id="predict-submit", n_clicks=0, className="button"),
        className="form",
    )
    result = html.Div(
        dcc.Loading(
            html.Div(
                ui.notice("Fill in a title and/or upload an image, then press Predict.", kind="muted"),
                id="predict-result",
            )
        ),
        className="result-col",
    )
    return html.Div(
        [
            html.H2("Predict a product's category"),
            html.P(
                "The production model classifies the product through the prediction service.",
                className="lead",
            ),
            html.Div([form, result], className="grid-2 predict-grid"),
            dcc.Store(id="predict-query"),
            ui.section(
                "Similar catalogue products",
                dcc.Loading(
                    html.Div(
                        ui.notice(
                            "The most similar catalogue products appear after a prediction.", kind="muted"
                        ),
                        id="predict-similar",
                    )
                ),
            ),
        ]
    )


def preview(contents: str | None, filename: str | None) -> Any:
    """The uploaded image, shown before predicting."""
    if not contents:
        return None
    return html.Figure([html.Img(src=contents, alt=filename or "upload"), html.Figcaption(filename)])


def render_prediction(response: dict, abstain_threshold: float | None = None) -> html.Div:
    """The service's answer: class, confidence gauge, top-5 chart, model version."""
    code = response.get("prdtypecode")
    name = response.get("class_name") or (class_name(code) if code is not None else "")
    abstained = bool(response.get("abstained"))
    badges = [ui.badge(f"{response.get('model_name', 'model')} v{response.get('model_version', '?')}")]
    if abstained:
        badges.append(ui.badge("abstained: confidence below the threshold, review by hand", "warn"))
    head = html.Div(
        [
            html.Div(
                [
                    html.Div("Predicted class", className="stat-label"),
                    html.Div(
                        [html.Span(str(code), className="code"), html.Span(name, className="name")],
                        className="prediction",
                        id="predict-class",
                    ),
                    html.Div(badges, className="badges"),
                ],
                className="prediction-main",
            ),
            html.Div(
                ui.graph(figures.confidence_gauge(float(response.get("confidence", 0.0)), abstain_threshold)),
                className="prediction-gauge",
            ),
        ],
        className="card prediction-card",
    )
    charts = ui.section("Top-5 classes", ui.graph(figures.top5_figure(response.get("top5") or [])))
    return html.Div([head, charts])


def predict_content(
    data: DataSource, designation: str | None, description: str | None, contents: str | None
) -> tuple[Any, dict | None]:
    """Result children and the query for the similar-products step (None when nothing was predicted)."""
    designation, description = (designation or "").strip(), (description or "").strip()
    image = decode_upload(contents)
    if not designation and not description and image is None:
        return ui.notice("Enter a title or a description, or upload an image.", kind="warn"), None
    if image is not None and (
        problem := image_problem(image, data.settings.max_image_pixels, data.settings.max_image_bytes)
    ):
        return ui.notice(f"The uploaded file is not a usable image ({problem}).", kind="warn"), None
    try:
        response = data.predict(designation, description, image)
    except Unavailable as err:
        return ui.notice(str(err), "Prediction unavailable", "error"), None
    query = {"designation": designation, "description": description}
    return render_prediction(response, data.settings.abstain_threshold), query


def render_similar(similar: pd.DataFrame, note: str) -> html.Div:
    """Tiles of the nearest catalogue products, with their similarity."""
    if similar.empty:
        return ui.notice("No similar product found.", kind="muted")
    tiles = [
        ui.product_card(
            row.productid,
            row.prdtypecode,
            row.designation,
            row.image_sha256 if row.has_image else None,
            subtitle=f"similarity {row.similarity:.3f}",
        )
        for row in similar.itertuples(index=False)
    ]
    return html.Div([html.Div(tiles, className="tiles"), html.P(note, className="hint")])


def similar_content(data: DataSource, query: dict | None, contents: str | None) -> Any:
    """Similar products of the last predicted query, or a message why there are none."""
    if not query:
        return ui.notice("The most similar catalogue products appear after a prediction.", kind="muted")
    try:
        similar, note = data.similar(query["designation"], query["description"], decode_upload(contents))
    except Unavailable as err:
        return ui.notice(str(err), kind="muted")
    return render_similar(similar, note)


def register(app: Dash, data: DataSource) -> None:
    app.callback(
        Output("predict-preview", "children"),
        Input("predict-image", "contents"),
        State("predict-image", "filename"),
    )(preview)

    @app.callback(
        Output("predict-result", "children"),
        Output("predict-query", "data"),
        Input("predict-submit", "n_clicks"),
        State("predict-designation", "value"),
        State("predict-description", "value"),
        State("predict-image", "contents"),
        prevent_initial_call=True,
    )
    @ui.safe(2)
    def _predict(_clicks: int, designation: str, description: str, contents: str) -> tuple:
        return predict_content(data, designation, description, contents)

    @app.callback(
        Output("predict-similar", "children"),
        Input("predict-query", "data"),
        State("predict-image", "contents"),
        prevent_initial_call=True,
    )
    @ui.safe(1)
    def _similar(query: dict | None, contents: str | None) -> Any:
        return similar_content(data, query, contents)
