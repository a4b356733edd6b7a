"""Training job against real Ray Tune + MLflow server + S3: runs, artifacts, registry, promotion, rollback."""

from __future__ import annotations

import io
import subprocess
from datetime import UTC, datetime

import mlflow
import numpy as np
import pyarrow as pa
import pytest
from mlflow import MlflowClient

from jobs import ingest as ingest_job
from jobs import promote as promote_job
from jobs import train as train_job
from lib.data import layout
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import put_bytes, put_json, put_table, s3_client
from lib.features.catalogue import current_catalogue
from lib.model import registry
from lib.model.artifact import input_dims, write_model_dir
from lib.model.dataset import load_dataset
from lib.model.evaluate import promote_if_better, score_codes
from lib.model.network import FusionConfig, MultimodalMLP
from lib.model.tune import default_trial, search_space, tune_head
from lib.ops.stack import reset_lake_and_registry
from lib.settings import PROJECT_ROOT


def write_synthetic_embeddings(settings, noise: float = 1.0, seed: int = 0) -> None:
    """Class-correlated embeddings for the current products, stored exactly as the embed job stores them.

    (The embed job itself is tested in test_embed; here the encoders would only cost time.)
    """
    client = s3_client(settings)
    catalogue = current_catalogue(client, settings)
    text_id, image_id, set_id, inputs = (
        catalogue.text_id,
        catalogue.image_id,
        catalogue.set_id,
        catalogue.inputs,
    )
    rng = np.random.default_rng(seed)
    codes = sorted(inputs["prdtypecode"].dropna().unique())
    text_centroids = rng.normal(size=(len(codes), text_id.dim))
    image_centroids = rng.normal(size=(len(codes), image_id.dim))
    index = np.array([codes.index(c) for c in inputs["prdtypecode"]])
    text = text_centroids[index] + rng.normal(scale=noise * 1.5, size=(len(index), text_id.dim))
    image = image_centroids[index] + rng.normal(scale=noise * 4, size=(len(index), image_id.dim))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    image = (image / np.linalg.norm(image, axis=1, keepdims=True)).astype(np.float32)
    run_id = f"synthetic-{seed}"
    table = pa.table(
        {
            "productid": inputs["productid"],
            "batch_id": inputs["batch_id"],
            "prdtypecode": inputs["prdtypecode"],
            "embed_hash": inputs["embed_hash"],
            "has_text": inputs["has_text"],
            "has_image": inputs["has_image"],
            "text_emb": pa.FixedSizeListArray.from_arrays(text.ravel(), text_id.dim),
            "image_emb": pa.FixedSizeListArray.from_arrays(image.ravel(), image_id.dim),
        }
    )
    put_table(
        client, settings.bucket_lake, f"{layout.embedding_run_prefix(set_id, run_id)}part-0.parquet", table
    )
    put_json(
        client,
        settings.bucket_lake,
        layout.embedding_run_manifest_key(set_id, run_id),
        {"run_id": run_id, "committed_at": datetime.now(UTC).isoformat(), "encoded": len(table)},
    )


def fresh_catalogue(settings, seed: int) -> None:
    """A fresh lake and registry holding 400 ingested products with synthetic embeddings."""
    reset_lake_and_registry(settings)
    buf = io.BytesIO()
    write_sample_zip(SampleSpec(products=400, seed=seed, image_size=32), buf)
    put_bytes(s3_client(settings), settings.bucket_incoming, f"train-{seed}.zip", buf.getvalue())
    ingest_job.run(f"s3://{settings.bucket_incoming}/train-{seed}.zip", settings)
    write_synthetic_embeddings(settings)


@pytest.fixture(scope="module")
def trained(ray_cluster, stack):
    """400 products with embeddings, one 3-trial tuning run of the fusion MLP."""
    fresh_catalogue(stack, seed=11)
    # The fusion MLP (the experts, the default head, have their own test below).
    return train_job.run(stack.model_copy(update={"head_kind": "mlp"}), trials=3, max_epochs=6)


def test_parent_run_nested_trials_metrics_and_artifacts(trained, stack):
    client = MlflowClient(stack.mlflow_uri)
    parent = client.get_run(trained.run_id)
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{trained.run_id}'")
    assert len(trials) == 3
    assert all(r.info.status in {"FINISHED", "KILLED"} for r in trials)
    history = client.get_metric_history(trials[0].info.run_id, "val_f1_macro")
    assert 1 <= len(history) <= 6 and [m.step for m in history] == list(range(1, len(history) + 1))
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(trials[0].data.metrics)
    assert {"lr", "weight_decay", "batch_size", "activation", "lexical_proj"} <= set(trials[0].data.params)
    metrics = parent.data.metrics
    for key in (
        "test_f1_macro",
        "test_f1_weighted",
        "test_accuracy",
        "ablation_text_test_f1_macro",
        "ablation_image_test_f1_macro",
        "test_ece_before",
        "test_ece_after",
        "ablation_fusion_test_f1_macro",
        "ablation_lexical_test_f1_macro",
        "ablation_fusion_lexical_test_f1_macro",
        "best_val_f1_macro",
    ):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["test_f1_macro"] > 0.3  # the synthetic classes are learnable (chance: 0.04)
    assert {p for p in parent.data.params if p.startswith("best_")} >= {"best_lr", "best_weight_decay"}
    artifacts = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {
        "confusion_matrix.png",
        "per_class_test.csv",
        "lineage.json",
        "ablation.json",
        "promotion.json",
    } <= artifacts
    expected_sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert parent.data.tags["git_sha"].removesuffix("-dirty") == expected_sha
    lineage = mlflow.artifacts.load_dict(f"runs:/{trained.run_id}/lineage.json")
    assert lineage["products"] == 400 and len(lineage["class_counts"]) == 27 and lineage["batch_ids"]


def test_first_model_is_registered_and_promoted_with_its_card(trained, stack):
    client = MlflowClient(stack.mlflow_uri)
    production = registry.version_by_alias(client, stack.registered_model_name, registry.PRODUCTION)
    assert trained.decision.promoted and production.version == trained.version
    loaded = registry.load_version(client, stack.registered_model_name, production.version)
    assert len(loaded.codes) == 27 and loaded.card["encoder_set_id"] == trained.lineage["encoder_set_id"]
    assert loaded.card["git_sha"] and loaded.card["batch_ids"] == trained.lineage["batch_ids"]
    assert loaded.card["temperature"] > 0 and loaded.card["calibration"]["test_ece_after"] >= 0
    # The first trial is the default configuration, whose lexical branch is on.
    assert trained.lineage["lexical_dim"] > 1000
    best = trained.best.config
    assert (loaded.lexical is not None) == (int(best["lexical_proj"]) > 0 or bool(best["lexical_wide"]))
    # The pyfunc flavour predicts probabilities too, from the product text as well when the head reads it.
    assert_pyfunc_predicts(stack, loaded)


def assert_pyfunc_predicts(settings, loaded) -> None:
    """The production model's pyfunc flavour gives class probabilities (from the text too if it reads it)."""
    pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}@production")
    text_dim, image_dim = input_dims(loaded.card)
    inputs = {
        "text_emb": np.zeros((2, text_dim), np.float32),
        "image_emb": np.zeros((2, image_dim), np.float32),
    }
    if loaded.lexical is not None:
        inputs["text"] = np.array(["Console PS4 Pro 1 To\nNeuve", "Piscine tubulaire ronde\n"])
    probs = pyfunc.predict(inputs)
    assert probs.shape == (2, 27) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_unchanged_embeddings_skip_training(trained, stack):
    again = train_job.run(stack, trials=3, max_epochs=6)
    assert again.skipped and "unchanged" in again.reason


def test_worse_model_is_not_promoted_better_one_is_and_rollback_swaps(trained, stack):
    client = MlflowClient(stack.mlflow_uri)
    name = stack.registered_model_name
    good = trained.version
    data, _ = load_dataset(s3_client(stack), stack)
    production = registry.load_version(client, name, good)
    card = production.card
    # An untrained head with the same contract: a clearly worse model.
    worse_model = MultimodalMLP(FusionConfig.from_dict(card["model_config"]))
    mlflow.set_tracking_uri(stack.mlflow_uri)
    mlflow.set_experiment(stack.mlflow_experiment)
    import tempfile
    from pathlib import Path

    with mlflow.start_run(run_name="worse"), tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "m", worse_model.state_dict(), card, production.lexical)
        info = registry.log_model(model_dir, card, [])
    worse = mlflow.register_model(info.model_uri, name).version
    worse_f1 = score_codes(data, registry.load_version(client, name, worse))
    decision = promote_if_better(client, stack, data, worse, worse_f1)
    assert not decision.promoted and decision.production_test_f1_macro_rescored > worse_f1
    assert registry.version_by_alias(client, name, registry.PRODUCTION).version == good

    # Make the worse one production by hand, then the good one beats it on the same split.
    registry.promote(client, name, worse)
    good_f1 = score_codes(data, registry.load_version(client, name, good))
    decision = promote_if_better(client, stack, data, good, good_f1)
    assert decision.promoted
    assert registry.version_by_alias(client, name, registry.PRODUCTION).version == good
    assert registry.version_by_alias(client, name, registry.PREVIOUS).version == worse

    production, previous = promote_job.rollback(stack)
    assert (production, previous) == (worse, good)
    assert promote_job.aliases(stack) == {"production": worse, "previous": good}
    promote_job.rollback(stack)  # and back
    assert registry.version_by_alias(client, name, registry.PRODUCTION).version == good


def test_pruning_keeps_aliased_and_newest_versions(trained, stack):
    client = MlflowClient(stack.mlflow_uri)
    name = stack.registered_model_name
    before = {v.version for v in client.search_model_versions(f"name='{name}'")}
    deleted = registry.prune_versions(client, name, keep=0)
    after = {v.version for v in client.search_model_versions(f"name='{name}'")}
    aliased = set(client.get_registered_model(name).aliases.values())
    assert after == aliased and set(deleted) == before - aliased


def test_replay_trains_exactly_the_given_configurations_in_order(trained, stack):
    """The ASHA-vs-FIFO benchmark's FIFO run replays ASHA's trials: the search must not sample others."""
    data, _ = load_dataset(s3_client(stack), stack)
    space = search_space(lexical=data.lexical_dim > 0)
    first = default_trial(space)
    second = {**first, "lr": 3e-4, "batch_size": 128, "activation": "relu", "lexical_proj": 0}
    mlflow.set_tracking_uri(stack.mlflow_uri)
    experiment = mlflow.set_experiment(f"{stack.mlflow_experiment}-replay")
    with mlflow.start_run() as parent:
        out = tune_head(
            stack, data, parent.info.run_id, experiment.experiment_id, 20, 2, "fifo", replay=[first, second]
        )
    assert out.trials == 2
    assert out.configs == [first, second]


# Last: it resets the lake and registry the `trained` fixture built.
def test_the_default_head_is_the_experts_tuned_fold_by_fold_and_promoted(trained, stack):
    """On a fresh registry: the experts' trials report one out-of-fold score per fold, the model is
    registered with its fusion weights, beats nothing (first model) and serves probabilities."""
    fresh_catalogue(stack, seed=12)
    out = train_job.run(stack, trials=2)
    assert stack.head_kind == "experts" and out.decision.promoted
    mlflow_client = MlflowClient(stack.mlflow_uri)
    trials = mlflow_client.search_runs(
        [mlflow_client.get_run(out.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{out.run_id}'"
    )
    assert len(trials) == 2 and {"lexical_c", "text_c", "image_c"} <= set(trials[0].data.params)
    history = mlflow_client.get_metric_history(trials[0].info.run_id, "val_f1_macro")
    assert 1 <= len(history) <= stack.expert_folds
    assert mlflow_client.get_run(out.run_id).data.params["folds"] == str(stack.expert_folds)
    loaded = registry.load_version(mlflow_client, stack.registered_model_name, out.version)
    assert loaded.ensemble is not None and loaded.card["head_kind"] == "experts"
    assert set(out.ablation) == {"lexical", "text", "image", "fusion", "fusion_lexical"}
    assert out.test["f1_macro"] > 0.3 and loaded.card["fusion_weights"]["lexical_scale"] > 0
    assert_pyfunc_predicts(stack, loaded)


# After the experts test: it builds on that production model.
def test_a_small_new_batch_refits_the_production_configuration_without_a_search(trained, stack):
    client = MlflowClient(stack.mlflow_uri)
    name = stack.registered_model_name
    production = registry.version_by_alias(client, name, registry.PRODUCTION)
    card = registry.load_version(client, name, production.version).card
    buf = io.BytesIO()
    write_sample_zip(SampleSpec(products=30, seed=13, image_size=32), buf)  # +~8 % rows: below 20 %
    put_bytes(s3_client(stack), stack.bucket_incoming, "small.zip", buf.getvalue())
    ingest_job.run(f"s3://{stack.bucket_incoming}/small.zip", stack)
    write_synthetic_embeddings(stack)
    out = train_job.run(stack, trials=5)
    assert out.retune.startswith("refit") and f"v{production.version}" in out.retune
    trials = client.search_runs(
        [client.get_run(out.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{out.run_id}'"
    )
    assert trials == [] and out.best.config == card["tune_config"]  # the final fit is the one training
    params = client.get_run(out.run_id).data.params
    assert params["retune"] == "refit" and stack.refit_folds != stack.expert_folds
    assert params["folds"] == str(stack.refit_folds)
    # Each phase's peak RSS is recorded, never falling (a high-water mark), and logged with the run.
    peaks = out.summary()["phase_peak_gb"]
    assert list(peaks) == ["load", "search", "fit", "register_promote"] and 0 < peaks["load"] <= peaks["fit"]
    assert client.get_run(out.run_id).data.metrics["peak_rss_gb_fit"] == out.phase_peak_gb["fit"]
