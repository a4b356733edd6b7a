"""Before a stage starts: is each service it needs reachable? A clear error in a second, instead of
minutes of client retries ending in a traceback."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from lib.errors import UserError
from lib.settings import Settings, is_loopback

TIMEOUT_S = 3.0


class ServiceUnavailable(UserError):
    """A service the stage needs does not answer."""


# Ray's single-node mode (named for Windows and macOS, where it is the default). On Linux, Ray swaps a
# loopback node address for the machine's network address, so its client server and three metrics servers
# listen there or on every interface; in this mode the node address stays 127.0.0.1 and they bind to it.
SINGLE_NODE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a Ray process (head, worker, driver, job client) one of the stack's: its
    auth mode and token, and on a loopback host the single-node mode (the head then listens on loopback
    only, and a client must resolve 127.0.0.1 as it does)."""
    env = {"RAY_AUTH_MODE": "disabled"}
    if settings.ray_token_auth:
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(settings.ray_auth_token_path)}
    if is_loopback(settings.host):
        env[SINGLE_NODE_VARIABLE] = "0"
    return env


def use_stack_ray(settings: Settings) -> None:
    """Make this process a client of the stack's Ray (before ``ray.init`` or a job client): ``ray_env``.

    A Ray job's driver (``RAY_ADDRESS`` set) keeps what it inherited from its cluster, and a process that
    already has an auth mode keeps it; without a token file (a stack started before token auth, which
    accepts any client) no token is set.
    """
    if "RAY_ADDRESS" in os.environ:
        return
    env = ray_env(settings)
    if not settings.ray_auth_token_path.exists() or "RAY_AUTH_MODE" in os.environ:
        env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    if not env:
        return
    os.environ.update(env)
    # lazy: Ray reads both into per-process constants when first imported, so refresh them the way Ray's
    # own token set-up does (ray._private.authentication) and set the single-node flag it would have read.
    from ray._private import ray_constants
    from ray._raylet import Config

    ray_constants.ENABLE_RAY_CLUSTER = os.environ.get(SINGLE_NODE_VARIABLE, "1") != "0"
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
