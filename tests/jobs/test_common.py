"""What a user sees on the common mistakes: one clear line and status 2, fast, never a traceback or a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from jobs import demo as demo_job
from jobs import ingest as ingest_job
from jobs import promote as promote_job
from lib.settings import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "down"),
    [
        (["jobs.ingest", "s3://incoming/x.zip"], "s3 at"),
        (["jobs.embed"], "s3 at"),
        (["jobs.train"], "mlflow at"),
        (["jobs.pipeline", "s3://incoming/x.zip"], "mlflow at"),
        (["jobs.promote", "--show"], "mlflow at"),
        (["jobs.monitor"], "mlflow at"),
    ],
)
def test_a_stack_that_is_not_running_is_named_at_once(command, down, tmp_path):
    """These used to retry the GCS or MLflow for minutes, then print a traceback."""
    ports = {name: str(free_port()) for name in ("S3", "MLFLOW", "RAY_GCS", "RAY_DASHBOARD")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAKUTEN_", "RAY_ADDRESS"))}
    env |= {f"RAKUTEN_{name}_PORT": port for name, port in ports.items()}
    env["RAKUTEN_STATE_DIR"] = str(tmp_path)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", *command], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert down in done.stderr and "make up" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 30


def test_a_local_path_instead_of_an_s3_uri_says_how_to_send_it(stack, capsys):
    assert ingest_job.main(["./sample.zip"]) == 2
    error = capsys.readouterr().err
    assert "not an S3 object URI" in error and "jobs.demo" in error


def test_the_demo_names_a_missing_zip(stack, tmp_path, capsys):
    assert demo_job.main([str(tmp_path / "missing.zip")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_showing_aliases_before_any_model_is_registered_is_a_clear_error(stack, monkeypatch, capsys):
    from lib.settings import get_settings

    monkeypatch.setenv("RAKUTEN_REGISTERED_MODEL_NAME", "never-registered-model")
    get_settings.cache_clear()
    try:
        assert promote_job.main(["--show"]) == 2
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "no model named 'never-registered-model' is registered yet" in capsys.readouterr().err
