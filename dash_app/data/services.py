"""What every reader shares: settings, caches, the S3 client and a health guard in front of each service.

A service that is down raises :class:`Unavailable` with a message meant for the user, after a short health
probe: a stopped stack costs milliseconds, not client retry loops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Literal, TypeVar

import httpx

from dash_app.data.cache import TTLCache
from lib.data.storage import s3_client
from lib.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
Service = Literal["s3", "mlflow", "serve"]

SERVICE_NAMES: dict[Service, str] = {
    "s3": "The S3 object store",
    "mlflow": "The MLflow tracking server",
    "serve": "The prediction service (Ray Serve)",
}
# Registered versions and run artifacts never change: that cache keeps entries for good (bounded).
IMMUTABLE_ENTRIES = 32


class Unavailable(RuntimeError):
    """A source cannot be read right now; the message tells the user what is missing or what to do."""


class Services:
    """Shared by the readers of one :class:`~dash_app.data.DataSource`: caches, S3 client, health guard."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = TTLCache(settings.dash_cache_ttl_s)
        self.immutable = TTLCache(ttl_s=float("inf"), max_entries=IMMUTABLE_ENTRIES)
        self._s3 = None
        self._s3_lock = threading.Lock()

    @property
    def s3(self):
        """The boto3 S3 client, built on first use (the app starts without touching any service)."""
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = s3_client(self.settings)
            return self._s3

    def urls(self) -> dict[Service, str]:
        s = self.settings
        return {"s3": s.s3_url, "mlflow": s.mlflow_uri, "serve": s.serve_url}

    def _probe(self, url: str) -> bool:
        try:
            httpx.get(url, timeout=self.settings.dash_probe_timeout_s)
        except httpx.HTTPError:
            return False
        return True

    def health(self) -> dict[str, bool]:
        """Whether S3, MLflow and Serve answer at all (cached)."""
        s = self.settings
        urls = {"s3": s.s3_url, "mlflow": f"{s.mlflow_uri}/health", "serve": f"{s.serve_url}/health"}
        # A refused connection costs nothing: while something is down, probe again soon to see it return.
        return self.cache.get(
            ("health",),
            lambda: {name: self._probe(url) for name, url in urls.items()},
            ttl_s=lambda up: s.dash_cache_ttl_s if all(up.values()) else s.dash_probe_timeout_s,
        )

    def require(self, service: Service) -> None:
        """Raise :class:`Unavailable` with a helpful message when ``service`` does not answer."""
        if not self.health()[service]:
            raise Unavailable(self.down_message(service))

    def down_message(self, service: Service) -> str:
        hint = "deploy it with `python -m serve.deploy`" if service == "serve" else "start it with `make up`"
        return f"{SERVICE_NAMES[service]} is not reachable at {self.urls()[service]}: {hint}."

    def guard(self, service: Service, what: str, read: Callable[[], T]) -> T:
        """Run ``read`` once ``service`` answers; any failure becomes :class:`Unavailable` (and is logged)."""
        self.require(service)
        try:
            return read()
        except Unavailable:
            raise
        except Exception as err:
            log.warning("dashboard: reading %s failed", what, exc_info=True)
            raise Unavailable(f"Could not read {what}: {type(err).__name__}: {err}") from err

    def cached(
        self, key: Hashable, service: Service, what: str, read: Callable[[], T], *, immutable: bool = False
    ) -> T:
        """``read()`` guarded by :meth:`guard`, cached under ``key`` (for good when ``immutable``)."""
        cache = self.immutable if immutable else self.cache
        return cache.get(key, lambda: self.guard(service, what, read))
