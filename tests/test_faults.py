"""Faults injected into real processes (``kill -9``), each ending with the lake consistent, nothing
duplicated and the right model in production. The README's fault matrix lists these tests.

Also fault tests, kept beside the feature they exercise: ``tests/serve/test_serve.py`` (the S3 server
stopped while Serve takes traffic; a Serve replica killed), ``tests/jobs/test_ingest.py`` (ZIP bombs,
lying sizes, a crash before commit), ``tests/jobs/test_pipeline.py`` (a failed stage resumed).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time

import psutil
from mlflow import MlflowClient

from jobs import submit as submitter
from jobs import watch as watch_job
from lib.data import lake
from lib.data.layout import IMAGES, pipeline_record_key
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import exists, get_json, list_keys, put_bytes
from lib.model import registry
from lib.ops import stack as stack_mod
from lib.ops.pipeline import FAILED, RESUME, RUNNING, SUBMIT, SUCCEEDED
from lib.ops.stack import reset_lake_and_registry


def sample_zip(seed: int, products: int) -> bytes:
    buf = io.BytesIO()
    write_sample_zip(SampleSpec(products=products, seed=seed, image_size=96), buf)
    return buf.getvalue()


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
    return value


def stage_status(s3, settings, batch_id: str, stage: str) -> str | None:
    key = pipeline_record_key(batch_id)
    if not exists(s3, settings.bucket_lake, key):
        return None
    return get_json(s3, settings.bucket_lake, key)["stages"].get(stage, {}).get("status")


def driver_of(text: str) -> psutil.Process | None:
    """The pipeline job's driver process: the Python one whose command line names the ZIP. Not the
    ``/bin/sh -c`` Ray's supervisor starts it under: killing that shell leaves the driver running, and the
    orphan then commits and archives the ZIP under the retry's feet."""
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        is_python = bool(argv) and "python" in argv[0].rsplit("/", 1)[-1]
        if is_python and "jobs.pipeline" in argv and any(text in arg for arg in argv):
            return proc
    return None


def finished(jobs, submission_id: str, timeout_s: float = 900) -> str:
    return submitter.wait(jobs, submission_id, timeout_s=timeout_s, poll_s=1)


def succeeded(jobs, submission_id: str) -> None:
    state = finished(jobs, submission_id)
    assert state == "SUCCEEDED", jobs.get_job_logs(submission_id)[-3000:]


def production(settings) -> str | None:
    found = registry.version_by_alias(MlflowClient(settings.mlflow_uri), settings.registered_model_name,
                                      registry.PRODUCTION)  # fmt: skip
    return found.version if found else None


def test_fault_ingest_driver_killed_mid_run_then_the_watchers_retry_completes_it(ray_cluster, s3, stack):
    reset_lake_and_registry(stack)
    products = 1500
    put_bytes(s3, stack.bucket_incoming, "killed.zip", sample_zip(41, products))
    watcher = watch_job.Watcher(stack)
    ((action, _key, job_id),) = watcher.scan()
    assert action == SUBMIT
    batch_id = job_id.removeprefix("pipeline-")
    # Kill the driver while its Ray Data tasks store images, before the batch is committed.
    wait_until(lambda: next(iter(list_keys(s3, stack.bucket_lake, IMAGES)), None), 180, "the first image")
    driver = wait_until(lambda: driver_of("killed.zip"), 30, "the driver process")
    os.kill(driver.pid, signal.SIGKILL)
    assert finished(watcher.jobs, job_id, 120) == "FAILED"
    assert not lake.committed_manifests(s3, stack), "killed too late: the batch was already committed"
    assert stage_status(s3, stack, batch_id, "ingest") == RUNNING  # what the kill left behind

    # The ZIP is still in incoming/: the watcher resubmits it, and the retry completes the batch.
    actions = watcher.scan()
    assert actions == [(SUBMIT, "killed.zip", f"{job_id}-retry1")]
    assert finished(watcher.jobs, actions[0][2]) == "SUCCEEDED", watcher.jobs.get_job_logs(actions[0][2])[
        -3000:
    ]
    (manifest,) = lake.committed_manifests(s3, stack)
    assert manifest["accepted"] == products and manifest["batch_id"] == batch_id
    current = lake.current_products(s3, stack, ["image_key"])
    assert len(current) == products and current["productid"].is_unique
    stored = set(list_keys(s3, stack.bucket_lake, IMAGES))
    assert set(current["image_key"].dropna()) <= stored  # every product's image, once per content
    assert not list(list_keys(s3, stack.bucket_incoming)) and production(stack) == "1"


def test_fault_mlflow_killed_during_training_leaves_production_and_the_retry_decides(
    production_model, ray_cluster, s3, stack
):
    before = production(stack)
    assert before is not None
    put_bytes(s3, stack.bucket_incoming, "second.zip", sample_zip(42, 300))
    watcher = watch_job.Watcher(stack)
    ((_action, _key, job_id),) = watcher.scan()
    batch_id = job_id.removeprefix("pipeline-")
    wait_until(lambda: stage_status(s3, stack, batch_id, "train") == RUNNING, 600, "training", every_s=1)
    mlflow_pid = next(r["pid"] for r in stack_mod.status(stack) if r["name"] == "mlflow")
    os.killpg(os.getpgid(mlflow_pid), signal.SIGKILL)  # the server and its worker, as a crash would
    try:
        assert finished(watcher.jobs, job_id, 600) == "FAILED"
        assert stage_status(s3, stack, batch_id, "train") == FAILED
    finally:
        stack_mod.up(stack, ["mlflow"], echo=lambda *_: None)
    assert production(stack) == before  # untouched by the failed run

    # The batch is ingested (its ZIP archived): the watcher finds the failed stage and resumes it.
    actions = watcher.scan()
    assert actions == [(RESUME, f"batch:{batch_id}", f"{job_id}-retry1")]
    assert finished(watcher.jobs, actions[0][2]) == "SUCCEEDED", watcher.jobs.get_job_logs(actions[0][2])[
        -3000:
    ]
    record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
    assert record["stages"]["train"]["status"] == SUCCEEDED
    result = record["stages"]["train"]["result"]
    assert production(stack) == (result["version"] if result["promoted"] else before)
    assert len(lake.committed_manifests(s3, stack)) == 2


def test_fault_ray_head_killed_during_embed_then_make_up_resumes_from_embed(s3, stack):
    import ray

    from lib.features.catalogue import current_catalogue
    from lib.features.embed import read_embeddings

    reset_lake_and_registry(stack)
    connected = ray.is_initialized()
    ray.shutdown()  # this process's driver would die with the head's GCS
    products = 600
    put_bytes(s3, stack.bucket_incoming, "headless.zip", sample_zip(43, products))
    watcher = watch_job.Watcher(stack)
    ((_action, _key, job_id),) = watcher.scan()
    batch_id = job_id.removeprefix("pipeline-")
    try:
        wait_until(lambda: stage_status(s3, stack, batch_id, "embed") == RUNNING, 300, "embedding")
        time.sleep(3)  # the encoders at work
        head = psutil.Process(next(r["pid"] for r in stack_mod.status(stack) if r["name"] == "ray"))
        machine = [head, *head.children(recursive=True)]  # GCS, raylet, workers, the job's driver
        for proc in machine:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit between listing and kill
                proc.kill()
        psutil.wait_procs(machine, timeout=30)
        record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
        assert record["stages"]["embed"] == record["stages"]["embed"] | {"status": RUNNING, "job": job_id}
    finally:
        stack_mod.up(stack, ["ray"], echo=lambda *_: None)  # what `make up` does for Ray
        if connected:
            ray.init(address=stack.ray_address, logging_level="WARNING", log_to_driver=False)

    # The restarted head knows no job: the watcher resumes the batch from embed, on the new cluster.
    watcher = watch_job.Watcher(stack)
    actions = watcher.scan()
    assert actions == [(RESUME, f"batch:{batch_id}", job_id)]
    succeeded(watcher.jobs, job_id)
    record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
    assert all(record["stages"][stage]["status"] == SUCCEEDED for stage in ("ingest", "embed", "train"))
    assert len(lake.committed_manifests(s3, stack)) == 1  # ingest was not redone
    catalogue = current_catalogue(s3, stack)
    stored = read_embeddings(s3, stack, catalogue.set_id, ["embed_hash"])["embed_hash"]
    assert len(stored) == products and stored.is_unique  # the killed run's rows are not visible
    assert catalogue.missing(s3, stack).empty and production(stack) == "1"
