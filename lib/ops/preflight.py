"""Before a stage starts: is each service it needs reachable? A clear error in a second, instead of
minutes of client retries ending in a traceback."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from lib.errors import UserError
from lib.settings import Settings

TIMEOUT_S = 3.0


class ServiceUnavailable(UserError):
    """A service the stage needs does not answer."""


def ray_auth_env(settings: Settings) -> dict[str, str]:
    """The environment that puts a Ray process (head, worker, driver, job client) in the stack's auth mode."""
    if not settings.ray_token_auth:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(settings.ray_auth_token_path)}


def use_ray_token(settings: Settings) -> None:
    """Make this process a client of the stack's Ray with its token (before ``ray.init`` or a job client).

    A process that already has an auth mode (a Ray job inherits its cluster's) is left as it is, and so is
    one whose stack has no token file yet (a stack started before token auth: it accepts any client).
    """
    if "RAY_AUTH_MODE" in os.environ or not settings.ray_token_auth:
        return
    if not settings.ray_auth_token_path.exists():
        return
    os.environ.update(ray_auth_env(settings))
    # lazy: Ray reads the auth mode into its per-process config when first imported; its own token set-up
    # (ray._private.authentication) refreshes that config the same way after setting the variable.
    from ray._raylet import Config

    Config.initialize("")


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
