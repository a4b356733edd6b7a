"""Bulk classification against the real stack: an unlabelled ZIP → one prediction per product in the
challenge's format; idempotent; routed by the watcher; waiting for a production model, then resumed."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from jobs import classify as classify_job
from jobs import submit as submitter
from jobs import watch as watch_job
from lib.data.layout import pipeline_record_key
from lib.data.rakuten import X_TEST_FILE
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import get_json, put_bytes
from lib.model import classify, registry
from lib.ops.pipeline import RESUME, SUBMIT, SUCCEEDED


def unlabelled_zip(seed: int, products: int = 120) -> bytes:
    buf = io.BytesIO()
    write_sample_zip(SampleSpec(products=products, seed=seed, image_size=48, with_labels=False), buf)
    return buf.getvalue()


def x_index(data: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        member = next(n for n in zf.namelist() if n.endswith(X_TEST_FILE))
        return list(pd.read_csv(zf.open(member), index_col=0).index)


def test_an_unlabelled_zip_gets_one_prediction_per_product_in_x_order_and_twice_changes_nothing(
    production_model, ray_cluster, s3, stack
):
    data = unlabelled_zip(61)
    put_bytes(s3, stack.bucket_incoming, "catalogue.zip", data)
    result = classify_job.run(stack, zip_uri=f"s3://{stack.bucket_incoming}/catalogue.zip")
    version = production_model["train"].version
    assert result.classified == result.products == 120 and result.model_version == version
    submission = classify.read_submission(s3, stack, result.batch_id)
    assert list(submission.columns) == ["prdtypecode"] and list(submission.index) == sorted(x_index(data))
    codes = registry.load_version(MlflowClient(stack.mlflow_uri), stack.registered_model_name, version).codes
    assert set(submission["prdtypecode"]) <= set(codes)

    # The actor pool (batches above classify_in_driver_max_rows) predicts what the job's process does.
    inputs = classify.batch_inputs(s3, stack, result.batch_id)
    pooled = stack.model_copy(update={"classify_in_driver_max_rows": 0, "classify_block_rows": 50})
    on_pool, in_driver = (
        classify_job.predict(s, s3, inputs, version).sort_values("row") for s in (pooled, stack)
    )
    assert list(on_pool["productid"]) == list(in_driver["productid"]) and len(on_pool) == 120
    assert np.array_equal(np.stack(on_pool["top5_codes"]), np.stack(in_driver["top5_codes"]))
    assert np.allclose(np.stack(on_pool["top5_scores"]), np.stack(in_driver["top5_scores"]), atol=1e-6)

    put_bytes(s3, stack.bucket_incoming, "catalogue-again.zip", data)
    again = classify_job.run(stack, zip_uri=f"s3://{stack.bucket_incoming}/catalogue-again.zip")
    assert again == result  # same batch, same model version: nothing rewritten


def test_the_watcher_classifies_an_unlabelled_zip_once_a_model_exists(
    production_model, ray_cluster, s3, stack
):
    client, name = MlflowClient(stack.mlflow_uri), stack.registered_model_name
    version = registry.version_by_alias(client, name, registry.PRODUCTION).version
    versions_before = len(client.search_model_versions(f"name='{name}'"))
    client.delete_registered_model_alias(name, registry.PRODUCTION)  # no production model for now
    try:
        put_bytes(s3, stack.bucket_incoming, "weekly.zip", unlabelled_zip(62))
        watcher = watch_job.Watcher(stack)
        ((action, _key, job_id),) = watcher.scan()
        assert action == SUBMIT and submitter.wait(watcher.jobs, job_id, 600) == "FAILED"
        batch_id = job_id.removeprefix("pipeline-")
        record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
        assert (
            "train" not in record["stages"]
            and record["stages"]["classify"]["waiting_for"] == "production model"
        )
        assert watcher.scan() == []  # still no model: the batch waits, its retry is not spent
    finally:
        client.set_registered_model_alias(name, registry.PRODUCTION, version)
    assert watcher.scan() == [(RESUME, f"batch:{batch_id}", f"{job_id}-retry1")]
    state = submitter.wait(watcher.jobs, f"{job_id}-retry1", 600)
    assert state == "SUCCEEDED", watcher.jobs.get_job_logs(f"{job_id}-retry1")[-3000:]
    record = get_json(s3, stack.bucket_lake, pipeline_record_key(batch_id))
    assert [record["stages"][s]["status"] for s in ("ingest", "embed", "classify")] == [SUCCEEDED] * 3
    assert classify.committed(s3, stack, batch_id).classified == 120
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before  # no training ran


def test_classifying_an_unknown_batch_is_a_clear_error(ray_cluster, stack, capsys):
    assert classify_job.main(["--batch", "0000000000000000"]) == 2
    assert "no committed batch '0000000000000000'" in capsys.readouterr().err
