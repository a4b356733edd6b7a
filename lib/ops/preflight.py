"""Before a stage starts: is each service it needs reachable? A clear error in a second, instead of
minutes of client retries ending in a traceback."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from lib.errors import UserError
from lib.settings import Settings

TIMEOUT_S = 3.0


class ServiceUnavailable(UserError):
    """A service the stage needs does not answer."""


def endpoints(settings: Settings, address: str | None = None) -> dict[str, tuple[str, int]]:
    """(host, port) of Ray's GCS (``address``: the one the job joins), S3 and the MLflow server."""
    ray_host, _, ray_port = (address or settings.ray_address).rpartition(":")
    s3, mlflow = urlsplit(settings.s3_url), urlsplit(settings.mlflow_uri)
    return {
        "ray": (ray_host, int(ray_port)),
        "s3": (s3.hostname or "", s3.port or (443 if s3.scheme == "https" else 80)),
        "mlflow": (mlflow.hostname or "", mlflow.port or (443 if mlflow.scheme == "https" else 80)),
    }


def require(settings: Settings, *names: str, ray_address: str | None = None) -> None:
    """Raise :class:`ServiceUnavailable` naming every one of ``names`` (ray, s3, mlflow) that does not
    accept a connection."""
    down = []
    for name, (host, port) in endpoints(settings, ray_address).items():
        if name not in names:
            continue
        try:
            socket.create_connection((host, port), timeout=TIMEOUT_S).close()
        except OSError:
            down.append(f"{name} at {host}:{port}")
    if down:
        raise ServiceUnavailable(
            f"{', '.join(down)} not reachable: is the stack running? Start it with `make up` "
            "(or point RAKUTEN_HOST and the RAKUTEN_*_PORT settings at yours)"
        )
