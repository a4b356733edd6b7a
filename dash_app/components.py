"""Small layout pieces shared by the pages (plain Dash components, styled by assets/style.css)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from dash import dcc, html, no_update

from lib.data.rakuten import class_name

log = logging.getLogger(__name__)
IMAGE_ROUTE = "/lake-image/"
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": False}


def notice(message: str, title: str | None = None, kind: str = "info") -> html.Div:
    """A message box in place of content: why there is nothing to show and what to do."""
    return html.Div(
        [html.Strong(title, className="notice-title") if title else None, html.Span(message)],
        className=f"notice notice-{kind}",
        role="status",
    )


def safe(outputs: int = 1) -> Callable[[Callable], Callable]:
    """Callback decorator: an unexpected error becomes a message in the first output, not an HTTP 500."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:
                log.exception("dashboard callback %s failed", fn.__name__)
                message = notice(f"{type(err).__name__}: {err}", "Something went wrong", "error")
                return message if outputs == 1 else (message, *[no_update] * (outputs - 1))

        return guarded

    return wrap


def section(title: str, *children: Any, className: str = "") -> html.Section:
    return html.Section([html.H3(title), *children], className=f"card {className}".strip())


def stat(label: str, value: Any, hint: str | None = None) -> html.Div:
    """One headline number."""
    return html.Div(
        [
            html.Div(label, className="stat-label"),
            html.Div(value, className="stat-value"),
            html.Div(hint, className="stat-hint") if hint else None,
        ],
        className="stat",
    )


def stats_row(items: Iterable[html.Div]) -> html.Div:
    return html.Div(list(items), className="stats")


def graph(figure: go.Figure, graph_id: str | None = None) -> dcc.Graph:
    kwargs = {"id": graph_id} if graph_id else {}
    return dcc.Graph(figure=figure, config=GRAPH_CONFIG, **kwargs)


def badge(text: str, kind: str = "neutral") -> html.Span:
    return html.Span(text, className=f"badge badge-{kind}")


def fmt_time(value: datetime | pd.Timestamp | None) -> str:
    if value is None or pd.isna(value):
        return "—"
    return pd.Timestamp(value).tz_convert("UTC").strftime("%Y-%m-%d %H:%M UTC")


def fmt_float(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def kv_table(rows: Sequence[tuple[str, Any]]) -> html.Table:
    """A two-column key/value table."""
    return html.Table(html.Tbody([html.Tr([html.Th(k), html.Td(v)]) for k, v in rows]), className="table kv")


def frame_table(frame: pd.DataFrame, formats: dict[str, Any] | None = None) -> html.Table:
    """A small DataFrame as an HTML table (``formats`` maps a column to a value formatter)."""
    formats = formats or {}
    header = html.Thead(html.Tr([html.Th(c) for c in frame.columns]))
    body = html.Tbody(
        [
            html.Tr(
                [
                    html.Td(formats[c](v) if c in formats else v)
                    for c, v in zip(frame.columns, row, strict=True)
                ]
            )
            for row in frame.itertuples(index=False)
        ]
    )
    return html.Table([header, body], className="table")


def image_url(sha256: str | None) -> str | None:
    """The dashboard's own route to a lake image (content-addressed, so cached by the browser)."""
    return f"{IMAGE_ROUTE}{sha256}" if isinstance(sha256, str) and sha256 else None


def product_card(
    productid: int | str,
    code: int | None,
    title: str,
    sha256: str | None,
    extra: Any = None,
    subtitle: str | None = None,
) -> html.Div:
    """A product tile: image (or a placeholder), title, class and details."""
    url = image_url(sha256)
    picture = (
        html.Img(src=url, alt=title, className="tile-img")
        if url
        else html.Div("no image", className="tile-img tile-noimg")
    )
    label = f"{code} · {class_name(code)}" if code is not None and not pd.isna(code) else "unlabelled"
    return html.Div(
        [
            picture,
            html.Div(
                [
                    html.Div(title, className="tile-title", title=title),
                    html.Div(label, className="tile-class"),
                    html.Div(subtitle, className="tile-sub") if subtitle else None,
                    html.Div(f"product {productid}", className="tile-id"),
                    extra,
                ],
                className="tile-body",
            ),
        ],
        className="tile",
    )
