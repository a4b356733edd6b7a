"""The pipeline and its watcher against the real stack: resume after a failed stage, exactly once per
ZIP content through Ray job submission, duplicates archived, one pipeline at a time."""

from __future__ import annotations

import io

import pytest
from mlflow import MlflowClient

from jobs import pipeline as pipeline_job
from jobs import submit as submitter
from jobs import train as train_job
from jobs import watch as watch_job
from lib.data import lake
from lib.data.layout import pipeline_record_key
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import exists, get_json, list_keys, put_bytes
from lib.model import registry
from lib.ops.pipeline import ARCHIVE_DUPLICATE, RESUME, SUBMIT, SUCCEEDED, WAIT
from lib.ops.stack import reset_lake_and_registry


def wait_succeeded(jobs, submission_id: str) -> None:
    """Wait for a pipeline job; on failure or timeout, show its log."""
    try:
        state = submitter.wait(jobs, submission_id, timeout_s=900)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{jobs.get_job_logs(submission_id)[-4000:]}")
    assert state == "SUCCEEDED", jobs.get_job_logs(submission_id)[-4000:]


def sample_zip(seed: int, products: int = 120) -> bytes:
    buf = io.BytesIO()
    write_sample_zip(SampleSpec(products=products, seed=seed, image_size=48), buf)
    return buf.getvalue()


@pytest.fixture
def clean(s3, stack):
    reset_lake_and_registry(stack)
    yield


def test_a_failed_stage_is_resumed_without_rerunning_the_others(ray_cluster, s3, stack, clean, monkeypatch):
    put_bytes(s3, stack.bucket_incoming, "resume.zip", sample_zip(21))
    uri = f"s3://{stack.bucket_incoming}/resume.zip"

    def broken_train(*args, **kwargs):
        raise RuntimeError("injected training failure")

    monkeypatch.setattr(train_job, "run", broken_train)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline_job.run(uri, stack)
    batch_id = lake.committed_manifests(s3, stack)[0]["batch_id"]
    record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
    assert [record["stages"][s]["status"] for s in ("ingest", "embed", "train")] == [
        SUCCEEDED,
        SUCCEEDED,
        "failed",
    ]
    ingested_at = record["stages"]["ingest"]["at"]

    monkeypatch.undo()
    # The ZIP is archived by now (out of the watcher's listing): a run by hand finds the record by the
    # ZIP's URI, and the watcher finds the failed batch by itself and resubmits its pipeline.
    assert pipeline_job.find_record(s3, stack, uri, None)[0]["batch_id"] == batch_id
    watcher = watch_job.Watcher(stack)
    actions = watcher.scan()
    assert actions == [(RESUME, f"batch:{batch_id}", f"pipeline-{batch_id}")]
    wait_succeeded(watcher.jobs, actions[0][2])
    record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
    assert record["stages"]["ingest"]["at"] == ingested_at  # only `train` ran again
    assert (
        record["stages"]["train"]["status"] == SUCCEEDED and record["stages"]["train"]["result"]["promoted"]
    )
    assert watcher.scan() == []  # finished: nothing more to do


def test_watcher_submits_one_job_per_zip_content_and_archives_copies(ray_cluster, s3, stack, clean):
    first, second = sample_zip(31), sample_zip(32)
    put_bytes(s3, stack.bucket_incoming, "drop-1.zip", first)
    put_bytes(s3, stack.bucket_incoming, "drop-2.zip", second)
    watcher = watch_job.Watcher(stack)
    actions = watcher.scan()
    assert [a[0] for a in actions] == [SUBMIT, WAIT]  # one pipeline at a time
    job_id = actions[0][2]
    wait_succeeded(watcher.jobs, job_id)

    # A restarted watcher, and the first ZIP dropped again under a new name.
    put_bytes(s3, stack.bucket_incoming, "drop-1-again.zip", first)
    restarted = watch_job.Watcher(stack)
    actions = dict((key, (action, sid)) for action, key, sid in restarted.scan())
    assert actions["drop-1-again.zip"] == (ARCHIVE_DUPLICATE, job_id)
    assert actions["drop-2.zip"][0] == SUBMIT
    assert not exists(s3, stack.bucket_incoming, "drop-1-again.zip")
    pipeline_jobs = [j for j in restarted.jobs.list_jobs() if (j.submission_id or "").startswith(job_id)]
    assert len(pipeline_jobs) == 1
    wait_succeeded(restarted.jobs, actions["drop-2.zip"][1])

    # Both batches committed, a production model registered with the code's git sha, incoming/ empty.
    assert len(lake.committed_manifests(s3, stack)) == 2
    assert not list(list_keys(s3, stack.bucket_incoming))
    client = MlflowClient(stack.mlflow_uri)
    production = registry.version_by_alias(client, stack.registered_model_name, registry.PRODUCTION)
    card = registry.load_version(client, stack.registered_model_name, production.version).card
    assert card["git_sha"] not in {"", "unknown"}
