"""Catalogue: size, classes, image coverage, imbalance, the latest batch's manifest, a product grid, and
the catalogues classified in bulk (class mix, confidence, submission.csv)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html, no_update

from dash_app import components as ui
from dash_app import figures
from dash_app.data import Catalogue, DataSource, Unavailable
from lib.data.rakuten import class_name
from lib.settings import Settings

PATH = "/catalogue"
TITLE = "Catalogue"
EMPTY_LAKE = (
    "The lake has no committed batch yet. Drop a Rakuten-format ZIP into s3://{bucket}/ "
    "(`make demo` does it with a generated sample) and the pipeline ingests it."
)


def layout(settings: Settings) -> html.Div:
    return html.Div(
        [
            html.H2("Catalogue"),
            html.P("The current product view of the lake (newest batch wins per product).", className="lead"),
            dcc.Store(id="catalogue-init", data=True),
            dcc.Loading(html.Div(id="catalogue-summary")),
            ui.section(
                "Browse a class",
                dcc.Dropdown(id="catalogue-class", options=[], placeholder="Choose a class", clearable=False),
                dcc.Loading(html.Div(id="catalogue-grid")),
            ),
            ui.section(
                "Classified catalogues",
                html.P(
                    "Unlabelled ZIPs dropped into incoming/ (or `python -m jobs.classify`) are classified in "
                    "bulk by the production model; each has a submission file in the challenge's format.",
                    className="hint",
                ),
                dcc.Loading(html.Div(id="classified-summary")),
                dcc.Dropdown(id="classified-batch", options=[], placeholder="Choose a classified batch"),
                html.Button("Download submission.csv", id="classified-download-button"),
                dcc.Download(id="classified-download"),
                dcc.Loading(html.Div(id="classified-detail")),
            ),
        ]
    )


def reasons_table(by_reason: dict[str, int] | None, empty: str) -> Any:
    if not by_reason:
        return html.P(empty, className="hint")
    frame = pd.DataFrame(sorted(by_reason.items(), key=lambda kv: -kv[1]), columns=["reason", "rows"])
    return ui.frame_table(frame)


def manifest_panel(manifest: dict) -> html.Div:
    """The latest batch: what was read, accepted, rejected (by reason), new or updated."""
    rows = [
        ("batch", html.Code(manifest.get("batch_id", "?"))),
        (
            "committed",
            ui.fmt_time(pd.Timestamp(manifest["committed_at"])) if "committed_at" in manifest else "—",
        ),
        ("source", manifest.get("source_uri", "—")),
        ("rows read", f"{manifest.get('rows_read', 0):,}"),
        ("accepted", f"{manifest.get('accepted', 0):,}"),
        ("rejected", f"{manifest.get('rejected', 0):,}"),
        ("with image", f"{manifest.get('with_image', 0):,}"),
        (
            "new / updated / unchanged",
            f"{manifest.get('new', 0):,} / {manifest.get('updated', 0):,} / {manifest.get('unchanged', 0):,}",
        ),
        ("labelled", "yes" if manifest.get("labelled", True) else "no"),
    ]
    return html.Div(
        [
            ui.kv_table(rows),
            html.H4("Rejected rows by reason"),
            reasons_table(manifest.get("rejected_by_reason"), "No row rejected."),
            html.H4("Kept without image, by reason"),
            reasons_table(
                manifest.get("kept_without_image_by_reason"), "Every accepted product has an image."
            ),
        ]
    )


def batches_table(manifests: list[dict]) -> html.Table:
    """Every committed batch, newest first."""
    frame = pd.DataFrame(
        [
            {
                "batch": m.get("batch_id"),
                "committed": ui.fmt_time(pd.Timestamp(m["committed_at"])) if "committed_at" in m else "—",
                "accepted": m.get("accepted"),
                "rejected": m.get("rejected"),
                "new": m.get("new"),
                "updated": m.get("updated"),
            }
            for m in reversed(manifests)
        ]
    )
    return ui.frame_table(frame)


def render_summary(catalogue: Catalogue, incoming_bucket: str) -> Any:
    """Headline numbers, class distribution and batches; a message for an empty lake."""
    if catalogue.products == 0:
        return ui.notice(EMPTY_LAKE.format(bucket=incoming_bucket), "No products yet")
    ratio = catalogue.imbalance_ratio
    stats = ui.stats_row(
        [
            ui.stat("products", f"{catalogue.products:,}", f"{catalogue.labelled:,} labelled"),
            ui.stat("classes", len(catalogue.class_counts)),
            ui.stat(
                "image coverage", f"{catalogue.image_coverage:.1%}", f"{catalogue.with_image:,} with image"
            ),
            ui.stat("imbalance ratio", f"{ratio:.1f}" if ratio else "—", "largest / smallest class"),
            ui.stat("batches", len(catalogue.manifests)),
        ]
    )
    latest = catalogue.latest_manifest
    return html.Div(
        [
            stats,
            html.Div(
                [
                    ui.section(
                        "Class distribution",
                        ui.graph(figures.class_distribution_figure(catalogue.class_counts)),
                    ),
                    html.Div(
                        [
                            ui.section("Latest batch", manifest_panel(latest))
                            if latest
                            else ui.notice("No committed batch."),
                            ui.section("All batches", batches_table(catalogue.manifests)),
                        ]
                    ),
                ],
                className="grid-2",
            ),
        ]
    )


def class_options(catalogue: Catalogue) -> list[dict]:
    return [
        {"label": f"{code} · {class_name(code)} ({n:,})", "value": code}
        for code, n in sorted(catalogue.class_counts.items(), key=lambda kv: -kv[1])
    ]


def render_grid(catalogue: Catalogue, code: int | None) -> Any:
    """Sample products of one class as tiles."""
    if code is None:
        return ui.notice("Choose a class to see some of its products.", kind="muted")
    rows = catalogue.samples[catalogue.samples["prdtypecode"] == code]
    if rows.empty:
        return ui.notice(f"No product of class {code} in the catalogue.", kind="muted")
    tiles = [
        ui.product_card(
            row.productid,
            row.prdtypecode,
            row.designation_clean,
            row.image_sha256 if row.has_image else None,
            extra=html.Div(row.description_clean, className="tile-desc") if row.description_clean else None,
        )
        for row in rows.itertuples(index=False)
    ]
    shown = f"{len(rows)} of {catalogue.class_counts.get(code, len(rows)):,} products of this class"
    return html.Div([html.P(shown, className="hint"), html.Div(tiles, className="tiles")])


def summary_content(data: DataSource) -> tuple[Any, list[dict], int | None]:
    """Summary children, class picker options and its default (the largest class)."""
    try:
        catalogue = data.catalogue()
    except Unavailable as err:
        return ui.notice(str(err), "Catalogue unavailable", "error"), [], None
    options = class_options(catalogue)
    return (
        render_summary(catalogue, data.settings.bucket_incoming),
        options,
        options[0]["value"] if options else None,
    )


def grid_content(data: DataSource, code: int | None) -> Any:
    try:
        catalogue = data.catalogue()
    except Unavailable as err:
        return ui.notice(str(err), kind="error")
    if catalogue.products == 0:
        return ui.notice("No products to browse yet.", kind="muted")
    return render_grid(catalogue, code)


NO_CLASSIFICATION = (
    "No catalogue classified yet. Drop a ZIP without its Y file into s3://{bucket}/, or run "
    "`python -m jobs.classify s3://{bucket}/NAME.zip`."
)


def classified_row(batch) -> dict:
    """One classified batch as a table row."""
    return {
        "batch": batch.batch_id,
        "committed": ui.fmt_time(pd.Timestamp(batch.committed_at)),
        "products": batch.classified,
        "abstained": f"{batch.abstained / max(batch.classified, 1):.1%}",
        "mean confidence": f"{batch.mean_confidence:.3f}",
        "model": f"{batch.model_name} v{batch.model_version}",
    }


def classified_content(data: DataSource) -> tuple[Any, list[dict], str | None]:
    """The table of classified batches, the batch picker's options and its default (the newest)."""
    try:
        batches = data.classified()
    except Unavailable as err:
        return ui.notice(str(err), "Classifications unavailable", "error"), [], None
    if not batches:
        return (
            ui.notice(NO_CLASSIFICATION.format(bucket=data.settings.bucket_incoming), kind="muted"),
            [],
            None,
        )
    frame = pd.DataFrame([classified_row(b) for b in batches])
    options = [{"label": f"{b.batch_id} ({b.classified:,} products)", "value": b.batch_id} for b in batches]
    return ui.frame_table(frame), options, batches[0].batch_id


def classified_detail(data: DataSource, batch_id: str | None) -> Any:
    """Class mix and confidence of one classified batch."""
    if batch_id is None:
        return None
    try:
        batch = next((b for b in data.classified() if b.batch_id == batch_id), None)
        predictions = data.classified_confidence(batch_id)
    except Unavailable as err:
        return ui.notice(str(err), kind="error")
    if batch is None:
        return ui.notice(f"No classification of batch {batch_id}.", kind="muted")
    counts = {int(code): n for code, n in batch.class_counts.items()}
    return html.Div(
        [
            ui.section("Predicted class mix", ui.graph(figures.class_distribution_figure(counts))),
            ui.section("Confidence", ui.graph(figures.confidence_histogram_figure(predictions))),
        ],
        className="grid-2",
    )


def register(app: Dash, data: DataSource) -> None:
    @app.callback(
        Output("classified-summary", "children"),
        Output("classified-batch", "options"),
        Output("classified-batch", "value"),
        Input("catalogue-init", "data"),
    )
    @ui.safe(3)
    def _classified(_init: Any) -> tuple:
        return classified_content(data)

    @app.callback(Output("classified-detail", "children"), Input("classified-batch", "value"))
    @ui.safe(1)
    def _classified_detail(batch_id: str | None) -> Any:
        return classified_detail(data, batch_id)

    @app.callback(
        Output("classified-download", "data"),
        Input("classified-download-button", "n_clicks"),
        State("classified-batch", "value"),
        prevent_initial_call=True,
    )
    def _download(_clicks: int | None, batch_id: str | None) -> Any:
        if not batch_id:
            return no_update
        return dcc.send_bytes(data.submission(batch_id), f"submission-{batch_id}.csv")

    @app.callback(
        Output("catalogue-summary", "children"),
        Output("catalogue-class", "options"),
        Output("catalogue-class", "value"),
        Input("catalogue-init", "data"),
    )
    @ui.safe(3)
    def _summary(_init: Any) -> tuple:
        return summary_content(data)

    @app.callback(Output("catalogue-grid", "children"), Input("catalogue-class", "value"))
    @ui.safe(1)
    def _grid(code: int | None) -> Any:
        return grid_content(data, code)
