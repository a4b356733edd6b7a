"""The local stack: SeaweedFS (S3), MLflow tracking/registry server and a Ray head, on loopback.

Each service runs in its own process group, its PID (and start time, to survive PID reuse) is kept
under ``state_dir/pids`` and its output under ``state_dir/logs``. ``up`` is idempotent (a healthy
service is left alone), ``down`` stops exactly the process groups it started and keeps the data.

CLI: ``python -m lib.ops.stack up|down|status|logs|sockets [SERVICE ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import SecretStr

from lib.errors import UserError
from lib.ops.exposure import check_exposure
from lib.ops.preflight import ray_env
from lib.settings import PROJECT_ROOT, Settings, get_settings, is_loopback

VENV_BIN = Path(sys.executable).parent
HAPROXY_WRAPPER = PROJECT_ROOT / "serve" / "haproxy_bind.sh"


@dataclass(frozen=True)
class Service:
    """One long-running process of the stack."""

    name: str
    command: list[str]
    health_url: str
    url: str
    host: str  # the interface it listens on
    port: int
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()  # the credentials it is given (``secret_env``): only those it needs
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 20.0
    before_start: Callable[[Settings], None] | None = None
    after_start: Callable[[Settings], None] | None = None


# Environment variables that carry a credential: never inherited by a service that was not given it.
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BACKEND_STORE_URI")


def _base_env(settings: Settings) -> dict[str, str]:
    """Environment shared by every service: the non-secret settings (so Ray workers and jobs see the
    same configuration as the launcher) and the venv first on PATH; no credential (``secret_env``)."""
    secret_fields = {f"RAKUTEN_{name.upper()}" for name, value in settings if isinstance(value, SecretStr)}
    secret_fields.add("RAKUTEN_MLFLOW_BACKEND_STORE_URI")
    env = {k: v for k, v in os.environ.items() if k not in secret_fields and k not in SECRET_VARIABLES}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{PROJECT_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env |= ray_env(settings)  # the head (so its workers and jobs) asks for the token, on loopback only
    env["MLFLOW_TRACKING_URI"] = settings.mlflow_uri
    env |= mlflow_client_env(settings)
    for name, value in settings:
        if value is not None and f"RAKUTEN_{name.upper()}" not in secret_fields:
            env[f"RAKUTEN_{name.upper()}"] = str(value)
    return env


def mlflow_client_env(settings: Settings) -> dict[str, str]:
    """MLflow client retry variables: its default (7 retries, backoff factor 2) waits ~4 min per call."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.mlflow_http_max_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip


def ensure_ray_token(settings: Settings) -> None:
    """Generate the stack's Ray token once (0600 in the state directory; never printed)."""
    path = settings.ray_auth_token_path
    if not settings.ray_token_auth or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(secrets.token_hex(32))


def secret_env(settings: Settings, names: tuple[str, ...]) -> dict[str, str]:
    """The credentials ``names`` as environment variables: ``s3`` (keys, for boto3 and the settings),
    ``serve_token`` (Serve's bearer token), ``mlflow_backend`` (the MLflow server's database URI)."""
    env: dict[str, str] = {}
    if "s3" in names:
        env |= settings.s3_env() | {
            "RAKUTEN_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
            "RAKUTEN_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        }
    if "serve_token" in names and settings.serve_auth_token is not None:
        env["RAKUTEN_SERVE_AUTH_TOKEN"] = settings.serve_auth_token.get_secret_value()
    if "mlflow_backend" in names:
        env["MLFLOW_BACKEND_STORE_URI"] = settings.mlflow_backend_uri
    return env


def _create_buckets(settings: Settings) -> None:
    # lazy: boto3 costs the stack CLI (status, down) half a second it rarely needs
    from lib.data.storage import ensure_buckets, s3_client

    ensure_buckets(s3_client(settings), settings.buckets)


def _s3_config_path(settings: Settings) -> Path:
    return settings.state_dir / "s3.json"


def _write_s3_config(settings: Settings) -> None:
    """SeaweedFS's identities file (0600): its keys reach it this way, not by argv or environment."""
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [
                    {
                        "accessKey": settings.s3_access_key.get_secret_value(),
                        "secretKey": settings.s3_secret_key.get_secret_value(),
                    }
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config_path = _s3_config_path(settings)
    if not config_path.exists() or json.loads(config_path.read_text()) != identities:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(identities))
        config_path.chmod(0o600)


def _s3_service(settings: Settings) -> Service:
    data = settings.state_dir / "s3"
    port = settings.s3_port
    command = [
        str(VENV_BIN / "weed"), "mini", f"-dir={data}",
        f"-ip={settings.host}", f"-ip.bind={settings.host}",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        # SeaweedFS opens several ports; derive them from the S3 port so two stacks can coexist
        # (gRPC ports are the HTTP port + 10000 by SeaweedFS's own rule).
        f"-s3.port={port}", f"-master.port={port + 1}", f"-volume.port={port + 2}",
        f"-filer.port={port + 3}", f"-admin.port={port + 4}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={_s3_config_path(settings)}",
    ]  # fmt: skip
    env = {"GOMEMLIMIT": settings.s3_go_memory_limit}
    return Service(
        "s3", command, f"http://{settings.host}:{port}/healthz", settings.s3_url, settings.host, port, env,
        start_timeout_s=60, before_start=_write_s3_config, after_start=_create_buckets,
    )  # fmt: skip


def _make_mlflow_dir(settings: Settings) -> None:
    (settings.state_dir / "mlflow").mkdir(parents=True, exist_ok=True)  # the default sqlite backend's home


def _mlflow_service(settings: Settings) -> Service:
    # The backend URI (it may hold a password) reaches the server by MLFLOW_BACKEND_STORE_URI, not argv.
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--artifacts-destination", f"s3://{settings.bucket_mlflow}/artifacts",
        "--host", settings.mlflow_bind_host, "--port", str(settings.mlflow_port),
        "--workers", "1",
    ]  # fmt: skip
    # Job execution spawns a pool of extra workers: 37 s and 2.9 GB at start-up instead of 12 s / 0.5 GB.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Service(
        "mlflow", command, f"{settings.mlflow_uri}/health", settings.mlflow_uri, settings.mlflow_bind_host,
        settings.mlflow_port, env,
        secrets=("s3", "mlflow_backend"),
        before_start=_make_mlflow_dir,
    )  # fmt: skip


# Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED set, without its direct ingress: that gives each ingress
# replica its own port (30000+), so there would be no fixed serve_port. Measured by bench_serve's
# set-up (text, concurrency 32, batched): 14 ms of CPU per request instead of 33 ms.
SERVE_LEAN_RUNTIME_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # replica code on the replica's own event loop
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # handle routing without a cross-thread hop
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",  # proxy → replica and handle calls over gRPC
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # access log written in blocks
    "RAY_SERVE_LOG_TO_STDERR": "0",  # replica logs go to their files only, not also to stderr
    # The controller's reconcile loop every 0.5 s, not 0.1: it spent 6 % of a core idle (bench_serve).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def serve_runtime_env(settings: Settings) -> dict[str, str]:
    """Environment of the Ray head for Serve's processes (controller, proxy, replicas)."""
    env = dict(SERVE_LEAN_RUNTIME_ENV) if settings.serve_lean_runtime else {}
    return env | (haproxy_env(settings) if settings.serve_haproxy else {})


def haproxy_env(settings: Settings) -> dict[str, str]:
    """Serve's HAProxy ingress, run through serve/haproxy_bind.sh (stats and metrics on loopback) with this
    stack's ports, its replicas' included. Its config and admin socket stay in Ray's per-node directories
    under /tmp (a Unix socket path must be short)."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(settings.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(settings.haproxy_metrics_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(settings.serve_replica_http_ports[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(settings.serve_replica_http_ports[-1]),
    }


def _ray_service(settings: Settings) -> Service:
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--node-ip-address={settings.host}", f"--port={settings.ray_gcs_port}",
        f"--dashboard-host={settings.host}", f"--dashboard-port={settings.ray_dashboard_port}",
        f"--ray-client-server-port={settings.ray_gcs_port + 1}",
        f"--dashboard-agent-listen-port={settings.ray_dashboard_port + 1}",
        f"--object-store-memory={settings.ray_object_store_bytes}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if settings.ray_num_cpus is not None:
        command.append(f"--num-cpus={settings.ray_num_cpus}")
    return Service(
        # /api/gcs_healthz answers without the token (/api/version asks for it).
        "ray", command, f"{settings.ray_dashboard_url}/api/gcs_healthz", settings.ray_dashboard_url,
        settings.host, settings.ray_dashboard_port, serve_runtime_env(settings),
        secrets=("s3", "serve_token"),
        # Ray keeps no state worth a graceful stop; some of its processes linger ~20 s after SIGTERM.
        stop_timeout_s=5,
    )  # fmt: skip


def _dash_service(settings: Settings) -> Service:
    command = [sys.executable, "-m", "dash_app"]
    return Service(
        "dash", command, f"{settings.dash_url}/healthz", settings.dash_url, settings.host, settings.dash_port,
        secrets=("s3", "serve_token"), stop_timeout_s=5,
    )  # fmt: skip


CORE_SERVICES = ("s3", "mlflow", "ray")


def services(settings: Settings) -> list[Service]:
    """The stack's services, in start order (the dashboard last: it reads from the others)."""
    return [_s3_service(settings), _mlflow_service(settings), _ray_service(settings), _dash_service(settings)]


# --- process bookkeeping ------------------------------------------------------------------------
def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.json"


def log_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "logs" / f"{name}.log"


def _running_process(settings: Settings, name: str) -> psutil.Process | None:
    """The process we started for ``name`` if it is still alive (same PID *and* start time)."""
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _start(settings: Settings, service: Service) -> psutil.Process:
    if service.before_start:
        service.before_start(settings)
    log = log_file(settings, service.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, service.name).parent.mkdir(parents=True, exist_ok=True)
    env = _base_env(settings) | secret_env(settings, service.secrets) | service.env
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%F %T')} starting {service.name}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            service.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=PROJECT_ROOT, start_new_session=True,
        )  # fmt: skip
    proc = psutil.Process(popen.pid)
    _pid_file(settings, service.name).write_text(
        json.dumps({"pid": popen.pid, "create_time": proc.create_time(), "command": service.command})
    )
    return proc


def _wait_healthy(settings: Settings, service: Service, proc: psutil.Process) -> None:
    deadline = time.monotonic() + service.start_timeout_s
    while time.monotonic() < deadline:
        if is_healthy(service.health_url):
            return
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            tail = log_file(settings, service.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{service.name} exited during start-up; last log lines:\n{tail}")
        time.sleep(0.5)
    raise TimeoutError(
        f"{service.name} not healthy at {service.health_url} after {service.start_timeout_s:.0f} s; "
        f"see {log_file(settings, service.name)}"
    )


def reset_lake_and_registry(settings: Settings) -> None:
    """Empty the lake and incoming buckets and delete the registered model: a system with no history."""
    # lazy: MLflow takes seconds to import; only the reset needs it
    from mlflow import MlflowClient

    from lib.data.storage import delete_prefix, s3_client

    client = s3_client(settings)
    for bucket in (settings.bucket_lake, settings.bucket_incoming):
        delete_prefix(client, bucket, "")
    registry_client = MlflowClient(settings.mlflow_uri)
    if registry_client.search_registered_models(f"name='{settings.registered_model_name}'"):
        registry_client.delete_registered_model(settings.registered_model_name)


def up(settings: Settings | None = None, names: list[str] | None = None, echo: Callable = print) -> None:
    """Start the services that are not running (all of them by default) and wait until healthy."""
    settings = settings or get_settings()
    selected = [s for s in services(settings) if names is None or s.name in names]
    check_exposure(settings, [service.name for service in selected])
    if not is_loopback(settings.host) and is_loopback(settings.mlflow_bind_host):
        echo(f"mlflow  has no authentication: listens on {settings.mlflow_bind_host} (RAKUTEN_MLFLOW_HOST)")
    ensure_ray_token(settings)
    started: list[tuple[Service, psutil.Process]] = []
    for service in selected:
        if _running_process(settings, service.name) is not None:
            echo(f"{service.name:7s} already running  {service.url}")
            continue
        if port_in_use(service.host, service.port):
            raise RuntimeError(
                f"{service.name}: port {service.port} on {service.host} is taken by a process this stack "
                f"did not start; stop it or set RAKUTEN_{service.name.upper()}_PORT to another port"
            )
        started.append((service, _start(settings, service)))
    # Services start in parallel; wait for each in order.
    for service, proc in started:
        t0 = time.monotonic()
        _wait_healthy(settings, service, proc)
        if service.after_start:
            service.after_start(settings)
        echo(f"{service.name:7s} started in {time.monotonic() - t0:4.1f} s  {service.url}")


def down(settings: Settings | None = None, names: list[str] | None = None, echo: Callable = print) -> None:
    """Stop the process groups this stack started (reverse order); data stays on disk."""
    settings = settings or get_settings()
    for service in reversed(services(settings)):
        if names is not None and service.name not in names:
            continue
        proc = _running_process(settings, service.name)
        if proc is None:
            echo(f"{service.name:7s} not running")
            _pid_file(settings, service.name).unlink(missing_ok=True)
            continue
        _stop_group(proc, service.stop_timeout_s)
        _pid_file(settings, service.name).unlink(missing_ok=True)
        echo(f"{service.name:7s} stopped")


def _stop_group(proc: psutil.Process, timeout_s: float) -> None:
    """SIGTERM the service's process group (it is the group leader), then SIGKILL what is left."""
    members = [proc, *proc.children(recursive=True)]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=5)


def status(settings: Settings | None = None) -> list[dict]:
    """Per service: name, pid (or None), healthy, url, rss_mb (whole process tree)."""
    settings = settings or get_settings()
    rows = []
    for service in services(settings):
        proc = _running_process(settings, service.name)
        rss = None
        if proc is not None:
            tree = [proc, *proc.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20
        rows.append(
            {
                "name": service.name,
                "pid": proc.pid if proc else None,
                "healthy": is_healthy(service.health_url),
                "url": service.url,
                "rss_mb": rss,
            }
        )
    return rows


def listening_sockets(settings: Settings) -> list[dict]:
    """Every listening TCP socket of the processes the stack started and of their descendants (Ray's
    daemons and workers, Serve's proxy and replicas): service, pid, process, address (an IPv4-mapped
    IPv6 address as its IPv4 form) and port."""
    rows = []
    for service in services(settings):
        proc = _running_process(settings, service.name)
        for member in [proc, *proc.children(recursive=True)] if proc else []:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                for conn in member.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        address = conn.laddr.ip.removeprefix("::ffff:")
                        rows.append({"service": service.name, "pid": member.pid, "process": member.name(),
                                     "address": address, "port": conn.laddr.port})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.ops.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status", "logs", "sockets"])
    parser.add_argument("services", nargs="*", help="default: all")
    parser.add_argument("--lines", type=int, default=30, help="log lines per service (logs)")
    args = parser.parse_args(argv)
    settings = get_settings()
    names = args.services or None
    if args.action == "up":
        try:
            up(settings, names)
        except UserError as err:
            print(f"stack: {err}", file=sys.stderr)
            return 2
    elif args.action == "down":
        down(settings, names)
    elif args.action == "status":
        for row in status(settings):
            state = "healthy" if row["healthy"] else ("running" if row["pid"] else "stopped")
            rss = f"{row['rss_mb']:7.0f} MB" if row["rss_mb"] else "         -"
            print(f"{row['name']:7s} {state:8s} pid={row['pid'] or '-':<8} rss={rss}  {row['url']}")
    elif args.action == "sockets":
        for row in listening_sockets(settings):
            where = f"{row['address']}:{row['port']}"
            print(f"{row['service']:7s} {where:22s} pid={row['pid']:<8} {row['process']}")
    else:
        for service in services(settings):
            if names and service.name not in names:
                continue
            path = log_file(settings, service.name)
            lines = path.read_text(errors="replace").splitlines()[-args.lines :] if path.exists() else []
            print(f"==> {path} <==", *lines, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
