"""The drift monitor against a real production model, real S3 prediction log and MLflow."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from mlflow import MlflowClient

from jobs import monitor as monitor_job
from lib.data import layout
from lib.data.layout import prediction_key
from lib.data.storage import delete_prefix, get_json, list_keys, put_table, s3_client
from lib.model import registry
from lib.model.dataset import load_dataset
from lib.model.split import TRAIN
from lib.ops.predlog import log_row, rows_to_table


def log_predictions(
    settings, text: np.ndarray, image: np.ndarray, texts: list[str], loaded, codes_override=None
) -> None:
    """Write prediction-log rows as Serve would, for the given inputs (embeddings and product texts)."""
    probs = loaded.probabilities(text, image, texts)  # as Serve does
    codes = np.array(loaded.codes)
    rows = []
    for i in range(len(text)):
        order = np.argsort(-probs[i])[:5]
        code = int(codes_override[i]) if codes_override is not None else int(codes[order[0]])
        prediction = {
            "prdtypecode": code,
            "confidence": float(probs[i, order[0]]),
            "abstained": False,
            "model_name": settings.registered_model_name,
            "model_version": loaded.version,
            "top5": [{"prdtypecode": int(codes[j]), "score": float(probs[i, j])} for j in order],
        }
        rows.append(log_row(prediction, text[i], image[i], True, bool(np.abs(image[i]).sum() > 0), f"h{i}"))
    put_table(
        s3_client(settings), settings.bucket_lake, prediction_key(datetime.now(UTC)), rows_to_table(rows)
    )


@pytest.fixture(scope="module")
def reference(production_model, stack):
    client = MlflowClient(stack.mlflow_uri)
    version = registry.version_by_alias(client, stack.registered_model_name, registry.PRODUCTION).version
    loaded = registry.load_version(client, stack.registered_model_name, version)
    data, _ = load_dataset(s3_client(stack), stack)
    return loaded, data


def test_unshifted_predictions_are_not_flagged(reference, stack, s3):
    loaded, data = reference
    delete_prefix(s3, stack.bucket_lake, layout.PREDICTIONS)
    train_rows = np.flatnonzero(data.split == TRAIN)
    pick = np.random.default_rng(0).choice(train_rows, 600)  # the training distribution itself
    texts = list(data.texts[pick])
    log_predictions(
        stack, data.text[pick], data.image[pick], texts, loaded, np.array(data.codes)[data.y[pick]]
    )
    report = monitor_job.run(stack, window_hours=1)
    assert report["predictions"] == 600
    assert not report["drifted"], report["signals"]
    assert {s["name"] for s in report["signals"]} == {
        "class_mix_psi",
        "class_mix_chi2_pvalue",
        "text_embedding_auc",
        "image_embedding_auc",
        "confidence_drop",
        "abstain_rate_increase",
    }


def test_three_classes_and_noise_images_are_flagged(reference, stack, s3):
    loaded, data = reference
    delete_prefix(s3, stack.bucket_lake, layout.PREDICTIONS)
    rng = np.random.default_rng(1)
    three = np.array(data.codes)[[0, 1, 2]]
    rows = np.flatnonzero(np.isin(np.array(data.codes)[data.y], three) & (data.split == TRAIN))
    pick = rng.choice(rows, 300)
    noise = rng.normal(size=(300, data.image.shape[1])).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    log_predictions(stack, data.text[pick], noise, list(data.texts[pick]), loaded)
    report = monitor_job.run(stack, window_hours=1)
    status = {s["name"]: s["drifted"] for s in report["signals"]}
    assert report["drifted"] and status["class_mix_psi"] and status["image_embedding_auc"]
    # The report is in S3 (JSON + HTML) and in MLflow.
    keys = list(list_keys(s3, stack.bucket_lake, layout.MONITORING))
    assert any(k.endswith("report.html") for k in keys)
    latest = sorted(k for k in keys if k.endswith("report.json"))[-1]
    assert get_json(s3, stack.bucket_lake, latest)["verdict"] == "drift"
    runs = MlflowClient(stack.mlflow_uri).search_runs(
        [
            MlflowClient(stack.mlflow_uri)
            .get_experiment_by_name(f"{stack.mlflow_experiment}-monitoring")
            .experiment_id
        ]
    )
    assert runs and "class_mix_psi" in runs[0].data.metrics


def test_window_parsing():
    assert monitor_job.parse_window("24h") == 24 and monitor_job.parse_window("90m") == 1.5
    assert monitor_job.parse_window("2d") == 48
    with pytest.raises(Exception, match="24h"):
        monitor_job.parse_window("yesterday")
