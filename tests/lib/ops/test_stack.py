"""The local stack against its real services: S3 (SeaweedFS), MLflow server, Ray head."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from lib.data.storage import arrow_fs, get_bytes, put_bytes, read_object, s3_client
from lib.ops import stack as stack_mod
from lib.ops.preflight import SINGLE_NODE_VARIABLE
from lib.settings import PROJECT_ROOT


def test_every_service_is_healthy(stack):
    rows = {row["name"]: row for row in stack_mod.status(stack)}
    assert set(rows) == {"s3", "mlflow", "ray", "dash"}
    core = [rows[name] for name in stack_mod.CORE_SERVICES]
    assert all(row["healthy"] and row["pid"] for row in core), rows


def test_up_twice_starts_no_duplicates(stack):
    before = {row["name"]: row["pid"] for row in stack_mod.status(stack)}
    lines: list[str] = []
    stack_mod.up(stack, list(stack_mod.CORE_SERVICES), echo=lines.append)
    after = {row["name"]: row["pid"] for row in stack_mod.status(stack)}
    assert before == after
    assert all("already running" in line for line in lines)


def test_s3_down_stops_its_process_and_up_keeps_the_data(stack, s3):
    put_bytes(s3, stack.bucket_lake, "probe/keep.txt", b"survives a restart")
    pid = next(r["pid"] for r in stack_mod.status(stack) if r["name"] == "s3")
    stack_mod.down(stack, ["s3"], echo=lambda *_: None)
    assert not stack_mod.port_in_use(stack.host, stack.s3_port)
    assert not any(r["pid"] for r in stack_mod.status(stack) if r["name"] == "s3")
    stack_mod.up(stack, ["s3"], echo=lambda *_: None)
    assert next(r["pid"] for r in stack_mod.status(stack) if r["name"] == "s3") != pid
    assert get_bytes(s3_client(stack), stack.bucket_lake, "probe/keep.txt") == b"survives a restart"


def test_up_refuses_a_port_taken_by_a_foreign_process(stack, tmp_path):
    foreign = stack.model_copy(update={"state_dir": tmp_path, "mlflow_port": stack.s3_port})
    with pytest.raises(RuntimeError, match=f"port {stack.s3_port}"):
        stack_mod.up(foreign, ["mlflow"], echo=lambda *_: None)


def test_buckets_exist(s3, stack):
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert set(stack.buckets) <= names


def test_boto3_and_pyarrow_round_trip(s3, stack):
    put_bytes(s3, stack.bucket_lake, "probe/hello.bin", b"\x00\x01bonjour")
    assert get_bytes(s3, stack.bucket_lake, "probe/hello.bin") == b"\x00\x01bonjour"
    table = pa.table({"productid": [1, 2, 3], "v": [0.5, 1.5, 2.5]})
    fs = arrow_fs(stack)
    pq.write_table(table, f"{stack.bucket_lake}/probe/t.parquet", filesystem=fs)
    assert pq.read_table(f"{stack.bucket_lake}/probe/t.parquet", filesystem=fs).equals(table)
    assert read_object(fs, stack.bucket_lake, "probe/hello.bin") == b"\x00\x01bonjour"  # same bytes, C++ path


def test_wrong_keys_are_refused(stack):
    bad = stack.model_copy(update={"s3_secret_key": SecretStr("not-the-key")})
    with pytest.raises(ClientError) as err:
        s3_client(bad).get_object(Bucket=stack.bucket_lake, Key="probe/hello.bin")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_mlflow_run_registry_and_alias(stack):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(stack.mlflow_uri)
    experiment = mlflow.set_experiment("stack-probe")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_metric("f1_macro", 0.5)
        mlflow.log_text("artifact stored in S3", "probe.txt")
    client = MlflowClient(stack.mlflow_uri)
    assert client.get_run(run.info.run_id).data.metrics["f1_macro"] == 0.5
    assert client.download_artifacts(run.info.run_id, "probe.txt")  # round-trips through S3
    client.create_registered_model("stack-probe-model")
    version = client.create_model_version(
        "stack-probe-model", f"runs:/{run.info.run_id}/probe.txt", run.info.run_id
    )
    client.set_registered_model_alias("stack-probe-model", "production", version.version)
    assert client.get_model_version_by_alias("stack-probe-model", "production").version == version.version
    # The artifact really lives in the S3 bucket.
    keys = [
        o["Key"] for o in s3_client(stack).list_objects_v2(Bucket=stack.bucket_mlflow).get("Contents", [])
    ]
    assert any(k.endswith("probe.txt") for k in keys)


def test_ray_task_runs_on_the_head(ray_cluster):
    @ray_cluster.remote
    def square(x: np.ndarray) -> float:
        return float((x**2).sum())

    assert ray_cluster.get(square.remote(np.arange(4))) == 14.0
    assert ray_cluster.cluster_resources()["CPU"] == 2


def test_ray_job_submit_succeeds_and_status_is_checked(stack):
    from ray.job_submission import JobStatus, JobSubmissionClient

    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", stack.ray_dashboard_url,
        "--runtime-env", "runtime_env.yaml", "--",
        "python", "-c", "import lib.settings, os; print('job sees S3 port', os.environ['RAKUTEN_S3_PORT'])",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"job sees S3 port {stack.s3_port}" in out.stdout
    client = JobSubmissionClient(stack.ray_dashboard_url)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    deadline = time.monotonic() + 30
    while client.get_job_status(jobs[-1].submission_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert client.get_job_status(jobs[-1].submission_id) == JobStatus.SUCCEEDED


REFUSED_PROBE = """
import sys, ray
from ray.job_submission import JobSubmissionClient
try:
    JobSubmissionClient(sys.argv[2]).list_jobs()
    print("job API answered")
except Exception as err:
    print("job API refused:", type(err).__name__)
try:
    ray.init(address=sys.argv[1])
    print("cluster accepted")
except Exception as err:
    print("cluster refused:", type(err).__name__)
"""


def test_the_stacks_ray_refuses_a_client_without_its_token(stack):
    """Ray without authentication runs any code sent to it: the stack's head now asks for a token."""
    token = stack.ray_auth_token_path
    assert token.exists() and token.stat().st_mode & 0o777 == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env[SINGLE_NODE_VARIABLE] = "0"  # the stack's Ray listens on loopback: a client resolves 127.0.0.1 so
    probe = subprocess.run([sys.executable, "-c", REFUSED_PROBE, stack.ray_address, stack.ray_dashboard_url],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "job API refused" in probe.stdout and "cluster refused" in probe.stdout, (
        probe.stdout + probe.stderr[-2000:]
    )
    with_token = env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    probe = subprocess.run([sys.executable, "-c", REFUSED_PROBE, stack.ray_address, stack.ray_dashboard_url],
                           env=with_token, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "job API answered" in probe.stdout and "cluster accepted" in probe.stdout, probe.stderr[-2000:]


def test_credentials_reach_only_the_service_that_needs_them_and_never_argv_or_pid_files(stack):
    """The MLflow backend URI (it may hold user:password) was on MLflow's command line and in its pid
    file, and every secret was exported into every service's environment."""
    secret = stack.s3_secret_key.get_secret_value()
    ray_token = stack.ray_auth_token_path.read_text()
    running = {r["name"]: psutil.Process(r["pid"]) for r in stack_mod.status(stack) if r["pid"]}
    assert {"s3", "mlflow", "ray"} <= set(running)
    for name, proc in running.items():
        assert not any(
            s in arg for arg in proc.cmdline() for s in (secret, stack.mlflow_backend_uri, ray_token)
        ), name
    for pid_file in (stack.state_dir / "pids").glob("*.json"):
        assert not any(s in pid_file.read_text() for s in (secret, stack.mlflow_backend_uri, ray_token))
    environments = {name: proc.environ() for name, proc in running.items()}
    # SeaweedFS reads its keys from its 0600 config file; only MLflow gets the database URI.
    assert secret not in environments["s3"].values() and "AWS_SECRET_ACCESS_KEY" not in environments["s3"]
    assert environments["mlflow"]["MLFLOW_BACKEND_STORE_URI"] == stack.mlflow_backend_uri
    assert "MLFLOW_BACKEND_STORE_URI" not in environments["ray"]
    assert environments["ray"]["AWS_SECRET_ACCESS_KEY"] == secret  # jobs and Serve replicas read S3


def test_beyond_loopback_nothing_starts_without_credentials(tmp_path):
    """Off loopback, S3 with its published default keys, a tokenless Serve or dashboard and a Ray without
    its token would each let anyone in: `make up` and `python -m dash_app` refuse, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAKUTEN_S3_", "RAKUTEN_SERVE_AUTH"))}
    env |= {"RAKUTEN_HOST": "0.0.0.0", "RAKUTEN_STATE_DIR": str(tmp_path), "RAKUTEN_RAY_TOKEN_AUTH": "false"}
    for command, names in ((["lib.ops.stack", "up"], ("S3_ACCESS_KEY", "SERVE_AUTH_TOKEN", "RAY_TOKEN_AUTH")),
                           (["dash_app"], ("SERVE_AUTH_TOKEN",))):  # fmt: skip
        refused = subprocess.run([sys.executable, "-m", *command], env=env, cwd=PROJECT_ROOT,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert all(f"RAKUTEN_{name}" in refused.stderr for name in names), refused.stderr
    assert not list(tmp_path.iterdir()), "nothing may be started or written before the check"


def test_bad_object_uri_is_a_clear_error():
    from lib.data.storage import split_uri

    assert split_uri("s3://incoming/a/b.zip") == ("incoming", "a/b.zip")
    with pytest.raises(ValueError, match="s3://bucket/key"):
        split_uri("s3://incoming")


def test_ray_head_gets_serves_lean_flags_and_haproxy_unless_turned_off(settings, ray_cluster):
    @ray_cluster.remote
    def worker_env(name: str) -> str | None:
        import os

        return os.environ.get(name)

    # Serve's processes are Ray workers: they inherit the head's environment.
    assert ray_cluster.get(worker_env.remote("RAY_SERVE_USE_GRPC_BY_DEFAULT")) == "1"
    assert ray_cluster.get(worker_env.remote("RAY_SERVE_ENABLE_HA_PROXY")) == "1"
    flags = stack_mod._ray_service(settings).env
    assert flags["RAY_SERVE_HAPROXY_STATS_PORT"] == str(settings.serve_port + 404)  # per stack, not 8404
    assert flags["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    assert flags["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in flags  # it would move the ingress off serve_port
    off = settings.model_copy(update={"serve_lean_runtime": False, "serve_haproxy": False})
    assert stack_mod._ray_service(off).env == {}
