"""Classify a whole catalogue in bulk with the ``production`` model: ingest → embed → classify, no training.

``python -m jobs.classify s3://incoming/NAME.zip`` · ``python -m jobs.classify --batch BATCH_ID`` (a
stored batch, with today's production model). Writes ``classified/<batch_id>/predictions.parquet`` and
``submission.csv`` (the challenge's format, X-file order), committed by a manifest written last. The
pipeline runs the same stage for an unlabelled ZIP dropped into ``incoming/``. The logic:
``lib.model.classify``.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pandas as pd
import ray
import scipy.sparse as sp
from mlflow import MlflowClient

from jobs import embed, ingest
from jobs.common import connect_ray, run_cli
from lib.data import lake
from lib.data.storage import s3_client
from lib.errors import UserError
from lib.model import classify, registry
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


class Classifier:
    """The model version loaded once, then applied to rows: in the job's process, or as a Ray Data actor
    applied to each block (``predict``)."""

    def __init__(self, settings: Settings, version: str) -> None:
        client = MlflowClient(settings.mlflow_uri)
        self.loaded = registry.load_version(client, settings.registered_model_name, version)
        self.threshold = settings.abstain_threshold

    def __call__(self, rows: pd.DataFrame, lexical: sp.csr_matrix | None = None) -> pd.DataFrame:
        return classify.classify_rows(self.loaded, rows, self.threshold, lexical)


def classify_stage(settings: Settings, client, batch_id: str) -> classify.ClassifiedBatch:
    """Classify a stored batch with the production model, unless that version already did."""
    t0 = time.monotonic()
    if not lake.is_committed(client, settings, batch_id):
        raise UserError(f"no committed batch {batch_id!r} in the lake (see the dashboard's catalogue page)")
    mlflow_client = MlflowClient(settings.mlflow_uri)
    production = registry.version_by_alias(mlflow_client, settings.registered_model_name, registry.PRODUCTION)
    if production is None:
        raise classify.NoProductionModel(
            f"no production model yet to classify batch {batch_id}: drop a labelled ZIP first; the "
            "watcher classifies this batch once a model is promoted"
        )
    done = classify.committed(client, settings, batch_id)
    if done is not None and done.model_version == production.version:
        return done
    with ThreadPoolExecutor(1) as loading:
        # The model downloads while the batch's products are read: both mostly wait on MLflow and S3.
        classifier = loading.submit(Classifier, settings, production.version)
        inputs = classify.batch_inputs(client, settings, batch_id)
        predictions = predict(settings, client, inputs, production.version, classifier)
    return classify.commit(client, settings, batch_id, predictions, len(inputs) - len(predictions),
                           time.monotonic() - t0)  # fmt: skip


def predict(
    settings: Settings,
    client,
    inputs: pd.DataFrame,
    version: str,
    loading: Future[Classifier] | None = None,
) -> pd.DataFrame:
    """Predictions of model ``version`` for the ``inputs`` (``classify.batch_inputs``) that have a stored
    embedding. Up to ``settings.classify_in_driver_max_rows`` rows in this process (with the ``loading``
    classifier, if given), above that on a Ray Data actor pool (spread over the cluster, one model load
    per actor)."""
    if len(inputs) > settings.classify_in_driver_max_rows:
        return _on_actor_pool(settings, classify.with_embeddings(client, settings, inputs), version)
    with ThreadPoolExecutor(1) as reading:
        # The embeddings are read while the TF-IDF rows are computed: S3 and Parquet decoding mostly run
        # without the GIL, so the read takes the other core.
        rows = reading.submit(classify.with_embeddings, client, settings, inputs)
        classifier = loading.result() if loading is not None else Classifier(settings, version)
        lexical = classifier.loaded.lexical_rows(list(inputs["lexical_text"]))
        rows = rows.result()
    return classifier(rows, None if lexical is None else lexical[rows["position"].to_numpy()])


def _on_actor_pool(settings: Settings, rows: pd.DataFrame, version: str) -> pd.DataFrame:
    size = settings.classify_block_rows
    blocks = [rows.iloc[i : i + size] for i in range(0, len(rows), size)]
    pool = ray.data.ActorPoolStrategy(size=max(1, min(settings.classify_actors, len(blocks))))
    mapped = ray.data.from_pandas(blocks).map_batches(
        Classifier, fn_constructor_args=(settings, version), batch_size=None, batch_format="pandas",
        compute=pool, num_cpus=settings.data_task_cpus,
    )  # fmt: skip
    return mapped.to_pandas()


def run(settings: Settings | None = None, zip_uri: str | None = None, batch_id: str | None = None):
    """Ingest the ZIP (or take the stored batch), embed what is missing, classify."""
    settings = settings or get_settings()
    require(settings, "s3", "mlflow")
    connect_ray(settings)
    client = s3_client(settings)
    if zip_uri is not None:
        batch_id = ingest.run(zip_uri, settings).manifest.batch_id
    embed.run(settings, batch_id)
    return classify_stage(settings, client, batch_id)


def describe(m: classify.ClassifiedBatch) -> str:
    """One line for people."""
    return (
        f"batch {m.batch_id}: {m.classified} products classified with {m.model_name} v{m.model_version} "
        f"({m.abstained} abstained, mean confidence {m.mean_confidence:.3f}, {m.without_embedding} without "
        f"embedding); submission: {m.submission_uri}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.classify", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("zip_uri", nargs="?", help="s3://incoming/NAME.zip (an X file without labels)")
    source.add_argument("--batch", default=None, help="re-classify this stored batch id")
    args = parser.parse_args(argv)
    return run_cli("classify", lambda: print(describe(run(zip_uri=args.zip_uri, batch_id=args.batch))) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
