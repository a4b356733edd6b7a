"""Cached, bounded readers for the dashboard: each returns a small DataFrame or dict, never a whole table.

Every read goes through one :class:`DataSource` (one per app). Reads are cached for
``settings.dash_cache_ttl_s``; a service that is down raises :class:`Unavailable` with a message meant for
the user, after a short health probe (so a stopped stack costs milliseconds, not client retry loops).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pandas as pd

from lib.metrics import ABLATION_ROWS
from lib.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MONITORING = "monitoring/"
REPORT_FILE = "report.json"
# Prediction columns the monitoring page needs (the embeddings stay in the lake).
PREDICTION_COLUMNS = [
    "timestamp", "model_version", "has_text", "has_image", "prdtypecode", "confidence", "abstained",
    "input_hash",
]  # fmt: skip
# Product columns for the catalogue view (and the embedding hash of the similarity index).
CATALOGUE_COLUMNS = [
    "productid", "batch_id", "prdtypecode", "designation_clean", "description_clean", "image_key",
    "image_sha256", "has_image",
]  # fmt: skip
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Rows per Parquet batch when streaming embeddings: bounds memory to a few MB whatever the file size.
STREAM_BATCH_ROWS = 1024
# Characters of a description kept for display in the catalogue grid.
DESCRIPTION_PREVIEW_CHARS = 160


class Unavailable(RuntimeError):
    """A source cannot be read right now; the message tells the user what is missing or what to do."""


class TTLCache:
    """A small thread-safe cache whose entries expire after ``ttl_s`` (errors are never cached)."""

    def __init__(self, ttl_s: float, max_entries: int = 128) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, compute: Callable[[], T], ttl_s: float | Callable[[T], float] | None = None
    ) -> T:
        """The cached value of ``key``; computed when missing or expired, once even if asked concurrently
        (page callbacks run in parallel and often need the same read)."""
        hit = self._fresh(key)
        if hit is not None:
            return hit[1]
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            hit = self._fresh(key)
            if hit is not None:
                return hit[1]
            value = compute()
            ttl = self.ttl_s if ttl_s is None else ttl_s
            if callable(ttl):
                ttl = ttl(value)
            with self._lock:
                self._entries[key] = (time.monotonic() + ttl, value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    evicted, _ = self._entries.popitem(last=False)
                    self._key_locks.pop(evicted, None)
        return value

    def _fresh(self, key: Hashable) -> tuple[float, Any] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self._entries.move_to_end(key)
                return hit
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --- value objects --------------------------------------------------------------------------------
@dataclass
class Catalogue:
    """Aggregates of the current catalogue plus a bounded per-class sample for the product grid."""

    products: int
    labelled: int
    with_image: int
    class_counts: dict[int, int]
    manifests: list[dict]
    samples: pd.DataFrame

    @property
    def image_coverage(self) -> float:
        return self.with_image / self.products if self.products else 0.0

    @property
    def imbalance_ratio(self) -> float | None:
        counts = [n for n in self.class_counts.values() if n > 0]
        return max(counts) / min(counts) if counts else None

    @property
    def latest_manifest(self) -> dict | None:
        return self.manifests[-1] if self.manifests else None


@dataclass
class ModelInfo:
    """A registered model version as the dashboard shows it."""

    alias: str
    version: str
    created: datetime | None
    run_id: str | None
    test_f1_macro: float | None
    test_f1_weighted: float | None
    batch_ids: list[str]
    git_sha: str | None
    encoder_set_id: str | None


@dataclass
class SimilarityIndex:
    """A bounded sample of catalogue embeddings (unit rows; zero rows for a missing modality)."""

    products: pd.DataFrame  # productid, prdtypecode, designation, image_sha256, has_image
    text: np.ndarray  # (n, text_dim)
    image: np.ndarray  # (n, image_dim)
    total: int = 0  # catalogue products the sample was drawn from

    def top(self, query_text: np.ndarray | None, query_image: np.ndarray | None, k: int) -> pd.DataFrame:
        """The ``k`` nearest products: mean cosine over the query's modalities."""
        parts = []
        if query_text is not None:
            parts.append(self.text @ query_text.reshape(-1))  # (n,)
        if query_image is not None:
            parts.append(self.image @ query_image.reshape(-1))  # (n,)
        if not parts or len(self.products) == 0:
            return self.products.head(0).assign(similarity=pd.Series(dtype=float))
        score = np.mean(parts, axis=0)
        order = np.argsort(-score)[:k]
        return self.products.iloc[order].assign(similarity=score[order]).reset_index(drop=True)


@dataclass
class RunDetails:
    """What the training page shows about one parent run."""

    run_id: str
    start: datetime | None
    params: dict[str, str]
    metrics: dict[str, float]
    per_class: pd.DataFrame | None = None
    confusion_png: bytes | None = None
    ablation: dict | None = None
    lineage: dict | None = None

    @property
    def best_params(self) -> dict[str, str]:
        return {k.removeprefix("best_"): v for k, v in sorted(self.params.items()) if k.startswith("best_")}


@dataclass
class QueryEncoders:
    """The text and image encoders, built once on first use (they cost ~300 MB and a second to load)."""

    settings: Settings
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _encoders: tuple | None = None

    def get(self) -> tuple:
        with self._lock:
            if self._encoders is None:
                from lib.encoders import build_image_encoder, build_text_encoder

                self._encoders = (build_text_encoder(self.settings), build_image_encoder(self.settings))
            return self._encoders

    def encode(self, text: str, image: bytes | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(text row, image row); None for an absent modality."""
        text_encoder, image_encoder = self.get()
        with self._lock:  # the encoders keep per-instance buffers; one query at a time is plenty here
            q_text = text_encoder.encode([text])[0] if text.strip() else None
            q_image = image_encoder.encode([image])[0] if image else None
        return q_text, q_image


# --- pure helpers ---------------------------------------------------------------------------------
def decode_upload(contents: str | None) -> bytes | None:
    """The bytes of a ``dcc.Upload`` data URI (``data:<type>;base64,<payload>``)."""
    if not contents:
        return None
    _, _, payload = contents.partition(",")
    return base64.b64decode(payload or contents)


def normalise_timestamps(column: pd.Series) -> pd.Series:
    """Timestamps as UTC datetimes, whether stored as datetimes, ISO strings or epoch seconds/ms."""
    if pd.api.types.is_numeric_dtype(column):
        unit = "ms" if column.dropna().abs().max() > 1e11 else "s"
        return pd.to_datetime(column, unit=unit, utc=True)
    return pd.to_datetime(column, utc=True, errors="coerce", format="mixed")


def tidy_predictions(frame: pd.DataFrame, since: datetime, max_rows: int) -> pd.DataFrame:
    """Predictions since ``since``, newest last, at most ``max_rows`` (the newest), with tidy dtypes."""
    if frame.empty or "timestamp" not in frame:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    frame = frame.copy()
    frame["timestamp"] = normalise_timestamps(frame["timestamp"])
    frame = frame[frame["timestamp"] >= pd.Timestamp(since)].sort_values("timestamp", kind="stable")
    frame = frame.tail(max_rows).reset_index(drop=True)
    if "model_version" in frame:
        frame["model_version"] = frame["model_version"].astype("string").fillna("?")
    for flag in ("abstained", "has_text", "has_image"):
        if flag in frame:
            frame[flag] = frame[flag].fillna(False).astype(bool)
    return frame


def sample_per_class(products: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Up to ``per_class`` products of each class, in a stable pseudo-random order (with images first)."""
    if products.empty:
        return products
    order = pd.util.hash_pandas_object(products["productid"], index=False).to_numpy()
    shuffled = products.assign(_order=order, _no_image=~products["has_image"].fillna(False).astype(bool))
    shuffled = shuffled.sort_values(["_no_image", "_order"], kind="stable")
    return shuffled.groupby("prdtypecode", dropna=True).head(per_class).drop(columns=["_order", "_no_image"])


# --- the data source ------------------------------------------------------------------------------
class DataSource:
    """Every read of the dashboard: S3 (lake), MLflow (runs, registry), Serve (predictions)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = TTLCache(settings.dash_cache_ttl_s)
        # Registered versions and run artifacts never change: cached by id without expiry (bounded).
        self.immutable = TTLCache(ttl_s=float("inf"), max_entries=32)
        self.encoders = QueryEncoders(settings)
        self._s3 = None
        self._client_lock = threading.Lock()

    def warm_up(self) -> None:
        """Import the MLflow client ahead of the first page view (the import alone takes seconds)."""
        import mlflow  # noqa: F401

        self.health()

    # --- clients and health ------------------------------------------------------------------------
    @property
    def s3(self):
        with self._client_lock:
            if self._s3 is None:
                from lib.storage import s3_client

                self._s3 = s3_client(self.settings)
            return self._s3

    def mlflow(self):
        """An MLflow client (after a health probe: its own retries would take minutes on a dead server)."""
        import mlflow
        from mlflow import MlflowClient

        self.require("mlflow")
        mlflow.set_tracking_uri(self.settings.mlflow_uri)
        return MlflowClient(self.settings.mlflow_uri)

    def _probe(self, url: str) -> bool:
        try:
            httpx.get(url, timeout=self.settings.dash_probe_timeout_s)
        except httpx.HTTPError:
            return False
        return True

    def health(self) -> dict[str, bool]:
        """Whether S3, MLflow and Serve answer at all (cached)."""
        s = self.settings
        urls = {"s3": s.s3_url, "mlflow": f"{s.mlflow_uri}/health", "serve": f"{s.serve_url}/health"}
        # A refused connection costs nothing: while something is down, probe again soon to see it return.
        return self.cache.get(
            ("health",),
            lambda: {name: self._probe(url) for name, url in urls.items()},
            ttl_s=lambda up: self.settings.dash_cache_ttl_s if all(up.values()) else s.dash_probe_timeout_s,
        )

    def require(self, service: str) -> None:
        """Raise :class:`Unavailable` with a helpful message when ``service`` does not answer."""
        if not self.health()[service]:
            raise Unavailable(self.down_message(service))

    def down_message(self, service: str) -> str:
        s = self.settings
        where = {"s3": s.s3_url, "mlflow": s.mlflow_uri, "serve": s.serve_url}[service]
        what = {
            "s3": "The S3 object store",
            "mlflow": "The MLflow tracking server",
            "serve": "The prediction service (Ray Serve)",
        }[service]
        hint = "deploy it with `python -m serve.deploy`" if service == "serve" else "start it with `make up`"
        return f"{what} is not reachable at {where}: {hint}."

    def _guard(self, service: str, what: str, fn: Callable[[], T]) -> T:
        """Run a read; connection problems become :class:`Unavailable` (logged for the operator)."""
        self.require(service)
        try:
            return fn()
        except Unavailable:
            raise
        except Exception as err:
            log.warning("dashboard: reading %s failed", what, exc_info=True)
            raise Unavailable(f"Could not read {what}: {type(err).__name__}: {err}") from err

    # --- catalogue ---------------------------------------------------------------------------------
    def catalogue(self) -> Catalogue:
        """Counts, manifests and a per-class sample of the current catalogue (cached)."""
        return self.cache.get(("catalogue",), lambda: self._guard("s3", "the lake", self._read_catalogue))

    def _read_catalogue(self) -> Catalogue:
        from lib import lake

        manifests = lake.committed_manifests(self.s3, self.settings)
        products = lake.current_products(self.s3, self.settings, CATALOGUE_COLUMNS, manifests)
        if products.empty:
            return Catalogue(0, 0, 0, {}, manifests, pd.DataFrame(columns=CATALOGUE_COLUMNS))
        has_image = products["has_image"].fillna(False).astype(bool)
        labelled = products["prdtypecode"].notna()
        counts = products.loc[labelled, "prdtypecode"].astype(int).value_counts().sort_index()
        samples = sample_per_class(products[labelled], self.settings.dash_grid_products).copy()
        samples["description_clean"] = (
            samples["description_clean"].fillna("").str.slice(0, DESCRIPTION_PREVIEW_CHARS)
        )
        return Catalogue(
            products=len(products),
            labelled=int(labelled.sum()),
            with_image=int(has_image.sum()),
            class_counts={int(k): int(v) for k, v in counts.items()},
            manifests=manifests,
            samples=samples.reset_index(drop=True),
        )

    def image(self, sha256: str) -> bytes | None:
        """The bytes of one lake image (content-addressed), or None if absent or not a SHA-256."""
        from botocore.exceptions import BotoCoreError, ClientError

        from lib.lake import image_key
        from lib.storage import get_bytes

        if not SHA256_RE.match(sha256):
            return None
        try:
            return get_bytes(self.s3, self.settings.bucket_lake, image_key(sha256))
        except (ClientError, BotoCoreError):  # absent, or S3 down: the page shows a broken tile, no error
            return None

    # --- registry and runs -------------------------------------------------------------------------
    def model(self, alias: str) -> ModelInfo | None:
        """The version behind ``alias`` with its scores and lineage, or None (cached)."""
        return self.cache.get(
            ("model", alias), lambda: self._guard("mlflow", "the model registry", lambda: self._model(alias))
        )

    def _model(self, alias: str) -> ModelInfo | None:
        from mlflow.exceptions import MlflowException

        client = self.mlflow()
        # Not lib.registry.version_by_alias: importing lib.registry loads torch (seconds, ~400 MB).
        try:
            version = client.get_model_version_by_alias(self.settings.registered_model_name, alias)
        except MlflowException:  # no such model or alias
            return None
        tags = version.tags or {}
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        if version.run_id:
            run = client.get_run(version.run_id)
            metrics, params = run.data.metrics, run.data.params
        f1 = tags.get("test_f1_macro")
        return ModelInfo(
            alias=alias,
            version=str(version.version),
            created=datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
            if version.creation_timestamp
            else None,
            run_id=version.run_id,
            test_f1_macro=float(f1) if f1 else metrics.get("test_f1_macro"),
            test_f1_weighted=metrics.get("test_f1_weighted"),
            batch_ids=json.loads(tags.get("batch_ids", "[]")),
            git_sha=tags.get("git_sha"),
            encoder_set_id=params.get("encoder_set_id"),
        )

    def card(self, version: str) -> dict:
        """The model card of one registered version (lib.registry.load_version; cached for good)."""

        def read() -> dict:
            from lib.registry import load_version

            return load_version(self.mlflow(), self.settings.registered_model_name, version).card

        key = ("card", self.settings.registered_model_name, version)
        return self.immutable.get(key, lambda: self._guard("mlflow", f"model card v{version}", read))

    def runs(self) -> pd.DataFrame:
        """Parent training runs (one row each, oldest first) with their test scores (cached)."""
        return self.cache.get(("runs",), lambda: self._guard("mlflow", "training runs", self._runs))

    def _runs(self) -> pd.DataFrame:
        client = self.mlflow()
        experiment = client.get_experiment_by_name(self.settings.mlflow_experiment)
        columns = ["run_id", "start", "status", "test_f1_macro", "test_f1_weighted", "promoted", "version"]
        if experiment is None:
            return pd.DataFrame(columns=columns)
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.stage = 'train'",
            order_by=["attributes.start_time DESC"],
            max_results=self.settings.dash_max_runs,
        )
        versions = {
            v.run_id: str(v.version)
            for v in client.search_model_versions(f"name='{self.settings.registered_model_name}'")
        }
        rows = [
            {
                "run_id": r.info.run_id,
                "start": datetime.fromtimestamp(r.info.start_time / 1000, UTC),
                "status": r.info.status,
                "test_f1_macro": r.data.metrics.get("test_f1_macro"),
                "test_f1_weighted": r.data.metrics.get("test_f1_weighted"),
                "promoted": r.data.tags.get("promotion"),
                "version": versions.get(r.info.run_id),
            }
            for r in runs
        ]
        return pd.DataFrame(rows, columns=columns).sort_values("start", kind="stable").reset_index(drop=True)

    def run_details(self, run_id: str) -> RunDetails:
        """Params, metrics and the small artifacts of one parent run (cached)."""
        return self.cache.get(
            ("run", run_id), lambda: self._guard("mlflow", f"run {run_id}", lambda: self._run_details(run_id))
        )

    def _run_details(self, run_id: str) -> RunDetails:
        client = self.mlflow()
        run = client.get_run(run_id)
        details = RunDetails(
            run_id=run_id,
            start=datetime.fromtimestamp(run.info.start_time / 1000, UTC),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
        )
        names = {a.path for a in client.list_artifacts(run_id)}
        with tempfile.TemporaryDirectory() as tmp:

            def fetch(name: str) -> Path | None:
                if name not in names:
                    return None
                return Path(client.download_artifacts(run_id, name, tmp))

            if path := fetch("per_class_test.csv"):
                details.per_class = pd.read_csv(path)
            if path := fetch("confusion_matrix.png"):
                details.confusion_png = path.read_bytes()
            if path := fetch("ablation.json"):
                details.ablation = json.loads(path.read_text())
            if path := fetch("lineage.json"):
                details.lineage = json.loads(path.read_text())
        if details.ablation is None:  # older runs: the metrics alone
            found = {
                m: {"f1_macro": details.metrics[f"ablation_{m}_test_f1_macro"]}
                for m in ABLATION_ROWS
                if f"ablation_{m}_test_f1_macro" in details.metrics
            }
            details.ablation = found or None
        return details

    def training_class_counts(self) -> dict[int, int]:
        """Class counts the production model was trained on (its run's lineage.json), or {}."""
        production = self.model("production")
        if production is None or not production.run_id:
            return {}
        lineage = self.run_details(production.run_id).lineage or {}
        return {int(k): int(v) for k, v in lineage.get("class_counts", {}).items()}

    # --- serving -----------------------------------------------------------------------------------
    def predict(self, designation: str, description: str, image: bytes | None) -> dict:
        """POST the product to the Serve endpoint; the response as a dict."""
        payload = {
            "designation": designation,
            "description": description,
            "image_base64": base64.b64encode(image).decode() if image else None,
        }
        url = f"{self.settings.serve_url}/predict"
        token = self.settings.serve_auth_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        try:
            response = httpx.post(
                url, json=payload, headers=headers, timeout=self.settings.dash_request_timeout_s
            )
        except httpx.TimeoutException as err:
            raise Unavailable(
                f"The prediction service did not answer within {self.settings.dash_request_timeout_s:g} s."
            ) from err
        except httpx.HTTPError as err:  # not deployed, or the stack is down
            raise Unavailable(self.down_message("serve")) from err
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise Unavailable(f"The prediction service answered {response.status_code}: {detail}")
        return response.json()

    def similarity_index(self, set_id: str) -> SimilarityIndex:
        """A bounded, cached sample of the catalogue's embeddings for encoder set ``set_id``."""
        return self.cache.get(
            ("index", set_id),
            lambda: self._guard("s3", "catalogue embeddings", lambda: self._similarity_index(set_id)),
        )

    def _similarity_index(self, set_id: str) -> SimilarityIndex:
        from lib import lake
        from lib.embed import embedding_inputs

        products = lake.current_products(self.s3, self.settings, CATALOGUE_COLUMNS)
        if products.empty:
            return SimilarityIndex(pd.DataFrame(), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
        inputs = embedding_inputs(products, self.settings, set_id)
        inputs["designation"] = products["designation_clean"].to_numpy()
        inputs["image_sha256"] = products["image_sha256"].where(inputs["has_image"]).to_numpy()
        # embed_hash is a uniform hash: its order is a stable random sample, the same on every refresh.
        sample = inputs.sort_values("embed_hash").head(self.settings.dash_similarity_rows)
        text, image = self._stream_vectors(set_id, sample["embed_hash"].tolist())
        found = ~np.isnan(text[:, 0]) if text.shape[1] else np.zeros(len(sample), bool)
        keep = sample.loc[found, ["productid", "prdtypecode", "designation", "image_sha256", "has_image"]]
        return SimilarityIndex(keep.reset_index(drop=True), text[found], image[found], total=len(products))

    def _stream_vectors(self, set_id: str, hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of ``hashes`` (NaN rows when missing), streamed batch by batch: memory stays bounded."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        from lib.embed import committed_runs, run_prefix
        from lib.storage import arrow_fs

        position = {h: i for i, h in enumerate(hashes)}
        wanted = pa.array(hashes, pa.string())
        fs = arrow_fs(self.settings)
        text = image = None
        # Oldest run first: a later run overwrites, as in lib.embed.read_embeddings.
        for run in committed_runs(self.s3, self.settings, set_id):
            selector = pafs.FileSelector(f"{self.settings.bucket_lake}/{run_prefix(set_id, run['run_id'])}")
            for info in fs.get_file_info(selector):
                if not info.path.endswith(".parquet"):
                    continue
                with fs.open_input_file(info.path) as handle:
                    parquet = pq.ParquetFile(handle)
                    for batch in parquet.iter_batches(
                        STREAM_BATCH_ROWS, columns=["embed_hash", "text_emb", "image_emb"]
                    ):
                        batch = batch.filter(pc.is_in(batch.column("embed_hash"), value_set=wanted))
                        if batch.num_rows == 0:
                            continue
                        t_dim = batch.schema.field("text_emb").type.list_size
                        i_dim = batch.schema.field("image_emb").type.list_size
                        if text is None:
                            text = np.full((len(hashes), t_dim), np.nan, np.float32)
                            image = np.full((len(hashes), i_dim), np.nan, np.float32)
                        rows = [position[h] for h in batch.column("embed_hash").to_pylist()]
                        text[rows] = batch.column("text_emb").flatten().to_numpy().reshape(-1, t_dim)
                        image[rows] = batch.column("image_emb").flatten().to_numpy().reshape(-1, i_dim)
        if text is None:  # nothing found: no dimension known either
            return np.zeros((len(hashes), 0), np.float32), np.zeros((len(hashes), 0), np.float32)
        return text, image

    def similar(self, designation: str, description: str, image: bytes | None) -> tuple[pd.DataFrame, str]:
        """The most similar catalogue products to a query, and a note on how they were found.

        The Serve response carries no embedding, so the query is encoded here with the same encoders
        (loaded once, lazily) and compared with a bounded sample of catalogue embeddings.
        """
        from lib.encoders import encoder_ids, encoder_set_id
        from lib.text import clean_text, product_text

        k = self.settings.dash_similar_products
        if k <= 0 or self.settings.dash_similarity_rows <= 0:
            raise Unavailable("Similar products are switched off (RAKUTEN_DASH_SIMILARITY_ROWS=0).")
        production = self.model("production")
        if production is None:
            raise Unavailable("No production model yet, so no embedding space to search.")
        set_id = production.encoder_set_id or self.card(production.version).get("encoder_set_id")
        if set_id != encoder_set_id(*encoder_ids(self.settings)):
            raise Unavailable(
                f"The production model uses encoder set {set_id}, the dashboard's settings another one: "
                "similar products would not be comparable."
            )
        index = self.similarity_index(set_id)
        if len(index.products) == 0:
            raise Unavailable("The catalogue has no embeddings for the production model's encoders yet.")
        text = product_text(clean_text(designation), clean_text(description), self.settings.text_max_chars)
        try:
            q_text, q_image = self.encoders.encode(text, image)
        except Exception as err:
            log.warning("dashboard: query encoding failed", exc_info=True)
            raise Unavailable(f"Could not encode the query: {type(err).__name__}: {err}") from err
        note = f"cosine similarity over a sample of {len(index.products):,} of {index.total:,} products"
        return index.top(q_text, q_image, k), note

    # --- monitoring --------------------------------------------------------------------------------
    def predictions(self, window: timedelta) -> pd.DataFrame:
        """Logged predictions of the last ``window`` (scalar columns only, newest ``max`` rows; cached)."""
        key = ("predictions", window.total_seconds())
        return self.cache.get(
            key, lambda: self._guard("s3", "the prediction log", lambda: self._preds(window))
        )

    def _preds(self, window: timedelta) -> pd.DataFrame:
        from lib.predlog import read_predictions

        since = datetime.now(UTC) - window
        frame = read_predictions(self.s3, self.settings, since, PREDICTION_COLUMNS)
        return tidy_predictions(frame, since, self.settings.dash_max_prediction_rows)

    def drift_report(self) -> dict | None:
        """The newest complete drift report (``monitoring/<UTC timestamp>/report.json``), or None."""
        return self.cache.get(("drift",), lambda: self._guard("s3", "drift reports", self._drift_report))

    def _drift_report(self) -> dict | None:
        from lib.storage import exists, get_json, list_prefixes

        bucket = self.settings.bucket_lake
        # Timestamps in UTC sort as text; a report still being written is skipped for the previous one.
        for prefix in sorted(list_prefixes(self.s3, bucket, MONITORING), reverse=True):
            if exists(self.s3, bucket, f"{prefix}{REPORT_FILE}"):
                report = get_json(self.s3, bucket, f"{prefix}{REPORT_FILE}")
                return {"key": f"{prefix}{REPORT_FILE}", **report}
        return None
