"""Bulk classification of a stored batch: the production head over the batch's stored embeddings, the
challenge's submission file, both committed by a manifest written last (``lib.data.layout``).

The per-row work (``classify_rows``) is pure; ``jobs/classify.py`` runs it in the job's process, or maps
it over a large batch with a Ray Data actor pool (one model load per actor).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from lib.data import lake
from lib.data.layout import (
    CLASSIFIED,
    CLASSIFIED_MANIFEST_FILE,
    CLASSIFIED_PREDICTIONS_FILE,
    CLASSIFIED_SUBMISSION_FILE,
    classified_batch_of,
    classified_key,
)
from lib.data.storage import (
    exists,
    get_bytes,
    get_json,
    get_table,
    list_prefixes,
    put_bytes,
    put_json,
    put_table,
)
from lib.data.text import lexical_text
from lib.errors import UserError
from lib.features.embed import PRODUCT_COLUMNS, embedding_inputs, read_embeddings, to_matrix
from lib.features.encoders import encoder_ids, encoder_set_id
from lib.model.artifact import LoadedModel, input_dims, reads_text
from lib.settings import Settings

TOP_K = 5


class NoProductionModel(UserError):
    """Nothing to classify with yet (the pipeline record says what the stage waits for)."""

    waiting_for = "production model"


def classify_rows(
    loaded: LoadedModel, rows: pd.DataFrame, threshold: float, lexical: sp.csr_matrix | None = None
) -> pd.DataFrame:
    """One prediction per row (same order). ``rows``: productid, row (the X file's index), text_emb,
    image_emb, lexical_text; ``lexical``: the rows' ``loaded.lexical_rows``, if already computed."""
    text_dim, image_dim = input_dims(loaded.card)
    text = to_matrix(rows["text_emb"], text_dim)
    image = to_matrix(rows["image_emb"], image_dim)
    texts = list(rows["lexical_text"]) if reads_text(loaded.card) and lexical is None else None
    probabilities = loaded.probabilities(text, image, texts, lexical)
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]
    scores = np.take_along_axis(probabilities, best, axis=1)
    codes = np.asarray(loaded.codes)[best]
    names = loaded.card.get("class_names", {})
    return pd.DataFrame(
        {
            "productid": rows["productid"].to_numpy(),
            "row": rows["row"].to_numpy(),
            "prdtypecode": codes[:, 0],
            "class_name": [names.get(str(c), "") for c in codes[:, 0]],
            "confidence": scores[:, 0],
            "top5_codes": list(codes),
            "top5_scores": list(scores),
            "abstained": scores[:, 0] < threshold,
            "model_version": str(loaded.version),
        }
    )


def submission_csv(predictions: pd.DataFrame) -> bytes:
    """The challenge's format: the X file's index column (unnamed) and ``prdtypecode``, in X-file order."""
    frame = predictions.sort_values("row")[["row", "prdtypecode"]].set_index("row")
    frame.index.name = None
    return frame.to_csv().encode()


def batch_inputs(client, settings: Settings, batch_id: str) -> pd.DataFrame:
    """The batch's products to classify: productid, row (the X file's index), lexical_text (cut as Serve
    cuts it) and embed_hash (what their stored embedding is found by)."""
    products = lake.batch_products(client, settings, batch_id, [*PRODUCT_COLUMNS, "row"])
    inputs = embedding_inputs(products, settings, encoder_set_id(*encoder_ids(settings)))
    fields_ = zip(products["designation_clean"], products["description_clean"], strict=True)
    cut = settings.lexical_max_chars
    return pd.DataFrame(
        {
            "productid": inputs["productid"].to_numpy(),
            "row": products["row"].to_numpy(),
            "lexical_text": [lexical_text(title, body, cut) for title, body in fields_],
            "embed_hash": inputs["embed_hash"].to_numpy(),
        }
    )


def with_embeddings(client, settings: Settings, inputs: pd.DataFrame) -> pd.DataFrame:
    """``inputs`` (``batch_inputs``) that have a stored embedding, with it (text_emb, image_emb) and their
    ``position`` in ``inputs``; in the order of ``inputs``."""
    set_id = encoder_set_id(*encoder_ids(settings))
    columns = ["embed_hash", "text_emb", "image_emb"]
    vectors = read_embeddings(client, settings, set_id, columns, inputs["embed_hash"].tolist())
    numbered = inputs.assign(position=np.arange(len(inputs)))
    return numbered.merge(vectors.drop_duplicates("embed_hash"), on="embed_hash", how="inner")


@dataclass
class ClassifiedBatch:
    """A committed bulk classification (its manifest)."""

    batch_id: str
    model_name: str
    model_version: str
    products: int
    classified: int
    without_embedding: int
    abstained: int
    mean_confidence: float
    class_counts: dict[str, int]
    predictions_uri: str
    submission_uri: str
    committed_at: str
    duration_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ClassifiedBatch:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def committed(client, settings: Settings, batch_id: str) -> ClassifiedBatch | None:
    """The batch's committed classification, if any."""
    key = classified_key(batch_id, CLASSIFIED_MANIFEST_FILE)
    if not exists(client, settings.bucket_lake, key):
        return None
    return ClassifiedBatch.from_dict(get_json(client, settings.bucket_lake, key))


def commit(
    client,
    settings: Settings,
    batch_id: str,
    predictions: pd.DataFrame,
    without_embedding: int,
    duration_s: float,
) -> ClassifiedBatch:
    """Write predictions and submission, then the manifest (the commit); a re-run overwrites them whole."""
    bucket = settings.bucket_lake
    predictions_key = classified_key(batch_id, CLASSIFIED_PREDICTIONS_FILE)
    submission_key = classified_key(batch_id, CLASSIFIED_SUBMISSION_FILE)
    put_table(client, bucket, predictions_key, pa.Table.from_pandas(predictions, preserve_index=False))
    put_bytes(client, bucket, submission_key, submission_csv(predictions), "text/csv")
    counts = predictions["prdtypecode"].value_counts().sort_index()
    manifest = ClassifiedBatch(
        batch_id=batch_id, model_name=settings.registered_model_name,
        model_version=str(predictions["model_version"].iloc[0]) if len(predictions) else "",
        products=len(predictions) + without_embedding, classified=len(predictions),
        without_embedding=without_embedding, abstained=int(predictions["abstained"].sum()),
        mean_confidence=float(predictions["confidence"].mean()) if len(predictions) else 0.0,
        class_counts={str(k): int(v) for k, v in counts.items()},
        predictions_uri=f"s3://{bucket}/{predictions_key}", submission_uri=f"s3://{bucket}/{submission_key}",
        committed_at=datetime.now(UTC).isoformat(), duration_s=round(duration_s, 3),
    )  # fmt: skip
    put_json(client, bucket, classified_key(batch_id, CLASSIFIED_MANIFEST_FILE), manifest.to_dict())
    return manifest


def committed_batches(client, settings: Settings) -> list[ClassifiedBatch]:
    """Every committed classification, newest first."""
    out = []
    for prefix in list_prefixes(client, settings.bucket_lake, CLASSIFIED):
        found = committed(client, settings, classified_batch_of(prefix))
        if found is not None:
            out.append(found)
    return sorted(out, key=lambda m: m.committed_at, reverse=True)


def read_predictions(client, settings: Settings, batch_id: str, columns: list[str]) -> pd.DataFrame:
    """Columns of a committed classification's predictions."""
    key = classified_key(batch_id, CLASSIFIED_PREDICTIONS_FILE)
    return get_table(client, settings.bucket_lake, key, columns).to_pandas()


def submission_bytes(client, settings: Settings, batch_id: str) -> bytes:
    """A committed classification's ``submission.csv``."""
    return get_bytes(client, settings.bucket_lake, classified_key(batch_id, CLASSIFIED_SUBMISSION_FILE))


def read_submission(client, settings: Settings, batch_id: str) -> pd.DataFrame:
    """A committed classification's submission file as a frame (index: the X file's index)."""
    return pd.read_csv(io.BytesIO(submission_bytes(client, settings, batch_id)), index_col=0)
