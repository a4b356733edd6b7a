"""Two Ray nodes on one machine (a head and a worker, 2 CPUs each): the embedding job spreads over both.

Each node is a ``ray start --block`` in its own process group, stopped by killing exactly that group
(``lib.ops.stack._stop_group``); no ``ray stop``, which would stop every Ray on the machine. The nodes share
the test stack's S3 and MLflow. The job runs in a subprocess with its own driver: this pytest process may
already be a driver of the test stack's Ray (``ray_cluster``), and ``connect_ray`` keeps that connection.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import put_bytes
from lib.features.embed import encoder_pool_size, read_embeddings
from lib.ops.preflight import SINGLE_NODE_VARIABLE, use_stack_ray
from lib.ops.stack import _base_env, _stop_group, is_healthy, port_in_use
from lib.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow

# Ports of this cluster: beside the test stack's Ray (26379/28265) and tests/test_cluster.py's (26390/28275).
GCS, CLIENT, DASHBOARD, HEAD_AGENT, WORKER_AGENT = 26395, 26396, 28285, 28286, 28287
TEMP_DIR = Path("/tmp/ray-multinode")
PIDS = Path("/tmp/ray-multinode.pids.json")  # the node groups of a run, for the next run if this one crashes
VENV_BIN = Path(sys.executable).parent
# More than (actors × batch size) rows: smaller blocks are bundled into fewer, larger ones by Ray Data,
# which could leave one node's actors without a block.
PRODUCTS = 200

# The driver: ingest, then embed with the job's own code. Three Ray Data knobs make the spread
# deterministic on a run this small (4 blocks): dispatch only once the whole actor pool is up, one block
# per actor at a time, no locality preference. With the defaults (locality first, 2 blocks in flight per
# actor) the actors of the node holding the blocks may take them all; on real volumes every actor is busy.
DRIVER = """
import json, sys
import ray
from jobs import embed, ingest
from jobs.common import connect_ray
from lib.features.encoders import build_image_encoder
from lib.settings import get_settings

settings = get_settings()
connect_ray(settings)
context = ray.data.DataContext.get_current()
context.wait_for_min_actors_s = 600
context.max_tasks_in_flight_per_actor = 1
context.execution_options.actor_locality_enabled = False
build_image_encoder(settings)  # export the ONNX model once here, not in four actors at once
ingest.run(sys.argv[1], settings)
print("RESULT " + json.dumps(embed.run(settings).to_dict()))
"""


def _stop_recorded_nodes() -> None:
    """Node groups a crashed run left (same PID *and* start time, as lib.ops.stack checks)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        for record in json.loads(PIDS.read_text()):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(record["pid"])
                if abs(proc.create_time() - record["create_time"]) < 1:
                    _stop_group(proc, 10)
    PIDS.unlink(missing_ok=True)


def _start_node(command: list[str], env: dict, log: Path, started: list[psutil.Process]) -> psutil.Process:
    with log.open("ab") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=PROJECT_ROOT, start_new_session=True)  # fmt: skip
    started.append(psutil.Process(popen.pid))
    PIDS.write_text(json.dumps([{"pid": p.pid, "create_time": p.create_time()} for p in started]))
    return started[-1]


def _alive_nodes() -> list:
    from ray.util.state import list_nodes

    try:
        return [n for n in list_nodes(address=f"http://127.0.0.1:{DASHBOARD}") if n.state == "ALIVE"]
    except Exception:  # the dashboard is still starting
        return []


def _wait(predicate, timeout_s: float, what: str, procs: list[psutil.Process], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if any(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs):
            pytest.fail(f"a node exited while waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


def test_embedding_actors_run_on_both_nodes(stack, s3, lake_reset, tmp_path):
    use_stack_ray(stack)  # this process asks the cluster (same token as the stack's) for its nodes
    _stop_recorded_nodes()
    for port in (GCS, DASHBOARD):
        assert not port_in_use("127.0.0.1", port), f"port {port} is taken: another multinode cluster runs"
    shutil.rmtree(TEMP_DIR, ignore_errors=True)
    env = _base_env(stack) | {"RAKUTEN_RAY_GCS_PORT": str(GCS), "RAKUTEN_RAY_DASHBOARD_PORT": str(DASHBOARD)}
    env.pop("RAY_ADDRESS", None)  # this process's env may carry the test stack's
    env[SINGLE_NODE_VARIABLE] = "1"  # two nodes: not the loopback stack's single-node mode
    driver_env = env | {"RAY_ADDRESS": f"127.0.0.1:{GCS}"}
    common = [f"--node-ip-address={stack.host}", "--num-cpus=2", "--object-store-memory=300000000",
              f"--temp-dir={TEMP_DIR}", "--disable-usage-stats", "--block"]  # fmt: skip
    head_cmd = [
        str(VENV_BIN / "ray"), "start", "--head", f"--port={GCS}", f"--ray-client-server-port={CLIENT}",
        f"--dashboard-host={stack.host}", f"--dashboard-port={DASHBOARD}",
        f"--dashboard-agent-listen-port={HEAD_AGENT}", '--resources={"head_node": 1}', *common,
    ]  # fmt: skip
    worker_cmd = [
        str(VENV_BIN / "ray"), "start", f"--address=127.0.0.1:{GCS}",
        f"--dashboard-agent-listen-port={WORKER_AGENT}", '--resources={"worker_node": 1}', *common,
    ]  # fmt: skip
    log = tmp_path / "nodes.log"
    started: list[psutil.Process] = []
    try:
        t0 = time.monotonic()
        _start_node(head_cmd, env, log, started)
        _wait(lambda: is_healthy(f"http://127.0.0.1:{DASHBOARD}/api/gcs_healthz"), 180, "head", started, log)
        _start_node(worker_cmd, env, log, started)
        _wait(lambda: len(_alive_nodes()) == 2, 180, "second node", started, log)
        nodes = {n.node_id: n for n in _alive_nodes()}
        head = next(i for i, n in nodes.items() if "head_node" in n.resources_total)
        worker = next(i for i, n in nodes.items() if "worker_node" in n.resources_total)
        print(f"\ntwo nodes up in {time.monotonic() - t0:.0f} s")

        buf = io.BytesIO()
        write_sample_zip(SampleSpec(products=PRODUCTS, seed=11, image_size=64), buf)
        put_bytes(s3, stack.bucket_incoming, "multinode.zip", buf.getvalue())
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, f"s3://{stack.bucket_incoming}/multinode.zip"],
            env=driver_env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:]
        manifest = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(f"ingest + embed on two nodes: {time.monotonic() - t0:.0f} s, manifest {manifest}")

        # 4 CPUs → 4 encoder actors of 0.75 CPU (0.5 left to the other tasks): both nodes hold some.
        size = encoder_pool_size(4, stack.embed_actor_cpus, stack.embed_reserve_cpus)
        assert manifest["actors"] == size == 4
        assert manifest["encoded"] == PRODUCTS
        frame = read_embeddings(s3, stack, manifest["encoder_set_id"], ["embed_hash", "node_id"])
        assert len(frame) == PRODUCTS
        per_node = frame["node_id"].value_counts().to_dict()
        print(f"rows per node: head {per_node.get(head, 0)}, worker {per_node.get(worker, 0)}")
        assert set(per_node) == {head, worker}, per_node
    finally:
        for proc in reversed(started):  # worker first, then head
            _stop_group(proc, 10)
        PIDS.unlink(missing_ok=True)
    assert not port_in_use("127.0.0.1", DASHBOARD) and not port_in_use("127.0.0.1", GCS)
    shutil.rmtree(TEMP_DIR, ignore_errors=True)
