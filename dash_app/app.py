"""The Dash app factory: layout shell, routing, service status and the lake image route.

Nothing happens at import time; :func:`create_app` builds everything from a :class:`Settings`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from dash import Dash, Input, Output, dcc, html
from flask import Flask, Response, abort, request

from dash_app.components import IMAGE_ROUTE
from dash_app.data import DataSource
from dash_app.pages import catalogue, monitoring, predict, training
from lib.ops.exposure import authorized
from lib.settings import Settings

PAGES: tuple[ModuleType, ...] = (predict, catalogue, training, monitoring)
SERVICES = (("s3", "S3"), ("mlflow", "MLflow"), ("serve", "Serve"))
# Images are content-addressed (the key is the SHA-256 of the bytes): a URL never changes meaning.
IMAGE_CACHE_CONTROL = "public, max-age=31536000, immutable"
HEALTH_ROUTE = "/healthz"  # open, for the stack's health probe; says nothing but "ok"


def page_for(pathname: str | None) -> ModuleType | None:
    """The page module serving ``pathname`` (None for an unknown path)."""
    path = (pathname or "/").rstrip("/") or "/"
    return next((page for page in PAGES if path == page.PATH), None)


def not_found(pathname: str | None) -> html.Div:
    return html.Div(
        [html.H2("Page not found"), html.P(f"Nothing at {pathname}. "), dcc.Link("Go to Predict", href="/")]
    )


def nav(pathname: str | None) -> list[Any]:
    current = page_for(pathname)
    return [
        dcc.Link(page.TITLE, href=page.PATH, className="nav-link active" if page is current else "nav-link")
        for page in PAGES
    ]


def status_dots(health: dict[str, bool]) -> list[Any]:
    """One dot per service: green when it answers."""
    return [
        html.Span(
            [html.Span(className=f"dot {'up' if health.get(key) else 'down'}"), label],
            className="service",
            title=f"{label} {'reachable' if health.get(key) else 'not reachable'}",
        )
        for key, label in SERVICES
    ]


def require_token(server: Flask, token: str) -> None:
    """Every request of ``server`` must carry ``token``: the browser asks for it (HTTP basic auth, any user
    name) and a script may send it as a bearer token. The dashboard forwards predictions to Serve with the
    token, so without this check whoever reached the dashboard would predict without one."""

    @server.before_request
    def _check() -> Response | None:
        given = request.headers.get("authorization")
        if request.path == HEALTH_ROUTE or authorized(given, token, basic=True):
            return None
        challenge = {"WWW-Authenticate": 'Basic realm="rakuten dashboard", charset="UTF-8"'}
        return Response("the dashboard asks for the Serve token (RAKUTEN_SERVE_AUTH_TOKEN)", 401, challenge)


def create_app(settings: Settings, data: DataSource | None = None) -> Dash:
    """A ready-to-run Dash app reading through ``data`` (built from ``settings`` by default)."""
    data = data or DataSource(settings)
    app = Dash(__name__, title="Rakuten product classification", update_title=None)
    if settings.serve_auth_token is not None:
        require_token(app.server, settings.serve_auth_token.get_secret_value())
    shell = html.Div(
        [
            dcc.Location(id="url"),
            html.Header(
                [
                    html.Div(
                        [html.Span("Rakuten", className="brand-mark"), " product classification"],
                        className="brand",
                    ),
                    html.Nav(nav("/"), id="nav"),
                    html.Div(id="services", className="services"),
                ],
                className="header",
            ),
            html.Main(id="page", className="page"),
        ]
    )
    app.layout = shell
    # Every page's components, so Dash can validate callbacks whose components are not rendered yet.
    app.validation_layout = html.Div([shell, *(page.layout(settings) for page in PAGES)])

    @app.callback(Output("page", "children"), Output("nav", "children"), Input("url", "pathname"))
    def _route(pathname: str | None) -> tuple:
        page = page_for(pathname)
        return (page.layout(settings) if page else not_found(pathname)), nav(pathname)

    @app.callback(Output("services", "children"), Input("url", "pathname"))
    def _services(_pathname: str | None) -> list[Any]:
        return status_dots(data.health())

    for page in PAGES:
        page.register(app, data)

    @app.server.route(HEALTH_ROUTE)
    def _health() -> Response:
        return Response("ok", mimetype="text/plain")

    @app.server.route(f"{IMAGE_ROUTE}<sha256>")
    def _lake_image(sha256: str) -> Response:
        # Served through the app so the browser needs no access to S3 and no credentials leave the server.
        body = data.image(sha256)
        if body is None:
            abort(404)
        return Response(body, mimetype="image/jpeg", headers={"Cache-Control": IMAGE_CACHE_CONTROL})

    return app
