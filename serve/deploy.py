"""Deploy the serving application to the running Ray cluster (it stays up after this command exits).

``python -m serve.deploy``          start Serve on ``host:serve_port``, deploy, wait for ``/health``
``python -m serve.deploy --down``   remove the application (and Serve itself when nothing else runs)
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request

import ray
from ray import serve

from lib.ops.preflight import use_stack_ray
from lib.settings import Settings, get_settings
from serve.app import build_app
from serve.logic import WAITING

HEALTH_POLL_S = 1.0


def _connect(settings: Settings) -> None:
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or settings.ray_address
        use_stack_ray(settings)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def probe_health(url: str, timeout_s: float = 5.0) -> tuple[int | None, dict]:
    """Status code and JSON body of ``GET url`` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return None, {}


def wait_health(settings: Settings, echo=print) -> bool:
    """Wait until ``/health`` answers: True when a model serves, False when it waits for one."""
    deadline = time.monotonic() + settings.serve_ready_timeout_s
    while time.monotonic() < deadline:
        status, body = probe_health(f"{settings.serve_url}/health")
        if status == 200:
            model = f"{body.get('model_name')} version {body.get('model_version')}"
            echo(f"serving {model} at {settings.serve_url}")
            return True
        if status == 503 and body.get("status") == WAITING:
            alias = f"@production of {settings.registered_model_name}"
            echo(f"deployed at {settings.serve_url}: {WAITING} ({alias})")
            return False
        time.sleep(HEALTH_POLL_S)
    raise TimeoutError(
        f"{settings.serve_url}/health did not answer in {settings.serve_ready_timeout_s:.0f} s"
    )


def deploy(settings: Settings, echo=print) -> bool:
    """Start Serve (HTTP on settings.host:serve_port) and deploy the app detached; see :func:`wait_health`."""
    app = build_app(settings)  # refuses a non-loopback host without a token before touching the cluster
    _connect(settings)
    serve.start(http_options={"host": settings.host, "port": settings.serve_port})
    t0 = time.monotonic()
    serve.run(app, name=settings.serve_app_name, route_prefix="/", blocking=False)
    echo(f"application {settings.serve_app_name!r} running after {time.monotonic() - t0:.0f} s")
    return wait_health(settings, echo)


def undeploy(settings: Settings, echo=print) -> None:
    """Delete the application; shut Serve down when no other application is left."""
    _connect(settings)
    serve.delete(settings.serve_app_name)
    echo(f"application {settings.serve_app_name!r} deleted")
    if not serve.status().applications:
        serve.shutdown()
        echo("no application left: Serve shut down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--down", action="store_true", help="remove the application")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.down:
        undeploy(settings)
    else:
        deploy(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
