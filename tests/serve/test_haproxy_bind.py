"""serve/haproxy_bind.sh: Ray's wildcard stats and metrics listeners rebound to loopback, nothing else."""

from __future__ import annotations

import os
import subprocess

from lib.ops.stack import HAPROXY_WRAPPER, VENV_BIN

RAY_CONFIG = """\
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind *:8000
listen stats
  bind *:8404
  stats enable
"""


def test_the_wrapper_rebinds_stats_and_metrics_to_loopback_and_runs_haproxy_with_the_same_arguments(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_CONFIG)
    env = os.environ | {"RAKUTEN_HAPROXY_BINARY": "/bin/echo"}
    ran = subprocess.run([str(HAPROXY_WRAPPER), "-db", "-f", str(config)], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert ran.stdout.split() == ["-db", "-f", str(config)]
    binds = [line.strip() for line in config.read_text().splitlines() if line.strip().startswith("bind")]
    # The HTTP frontend is Serve's configured host, which Ray writes itself ("*" for 0.0.0.0): untouched.
    assert binds == ["bind 127.0.0.1:9101", "bind *:8000", "bind 127.0.0.1:8404"]


def test_the_wrapper_finds_the_binary_bundled_with_ray_serve():
    env = {k: v for k, v in os.environ.items() if k != "RAKUTEN_HAPROXY_BINARY"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"  # as on a Ray node: the venv's python first
    ran = subprocess.run([str(HAPROXY_WRAPPER), "-v"], env=env, capture_output=True, text=True, check=True)
    assert ran.stdout.startswith("HAProxy version")
