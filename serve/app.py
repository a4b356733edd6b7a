"""The Ray Serve application: an HTTP ingress, two batched encoders and the batched fusion head.

```
HTTP → Ingress (FastAPI: parse + validate; @serve.batch groups concurrent requests)
         ├─ TextEncoder.encode   @serve.batch ┐ embeddings handed on as unresolved
         ├─ ImageEncoder.encode  @serve.batch ┘ DeploymentResponses
         └─ FusionModel.predict  @serve.batch → predictions + prediction-log rows
```

Each ingress batch is one *group*: one handle call per deployment for the whole group, so Serve's
per-call cost (routing, serialisation, an actor task) is paid once per batch, not once per request;
the downstream deployments batch groups again. FusionModel serves the registry alias ``production``:
a new replica loads it before taking traffic, then a background thread polls the alias and swaps the
model atomically when it moves. Batch sizes and wait timeouts are every deployment's ``user_config``
(changed at runtime without restarting replicas).
"""

# No `from __future__ import annotations`: FastAPI must see real classes in the route signatures.
import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from lib.ops.exposure import authorized, check_exposure
from lib.settings import Settings, get_settings
from serve import logic

logger = logging.getLogger("ray.serve")
MODEL_NOT_LOADED = "no production model loaded yet"
# Ingress batches in flight at once: enough to keep the encoder and head stages busy together.
INGRESS_BATCHES_IN_FLIGHT = 4
RETRY_FIRST_DELAY_S, RETRY_MAX_DELAY_S = 0.1, 2.0
INNER_DEPLOYMENTS = ("TextEncoder", "ImageEncoder", "FusionModel")
# An image batch is split over the lanes no other batch holds, down to this many images per chunk: the
# image encoder's cost per image does not fall with the batch size (unlike the text encoder's), so at low
# load splitting cuts latency; under load every lane has its own batch and nothing is split.
IMAGE_CHUNK_MIN = 2
# Histogram buckets of the custom metrics (Ray's metrics endpoint).
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


def batch_configs(settings: Settings, max_batch_size: int | None = None) -> dict[str, dict]:
    """The ``user_config`` of each deployment: the ingress forms batches, the others coalesce groups."""
    size = max_batch_size or settings.serve_max_batch_size
    configs = {
        "Ingress": {"max_batch_size": size, "batch_wait_timeout_s": settings.serve_batch_wait_timeout_s}
    }
    inner = {"max_batch_size": size, "batch_wait_timeout_s": settings.serve_inner_batch_wait_timeout_s}
    return configs | dict.fromkeys(INNER_DEPLOYMENTS, inner)


def _apply_batch_config(method: Any, config: dict) -> None:
    method.set_max_batch_size(int(config["max_batch_size"]))
    method.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))


class _Batched:
    """Shared by the batched deployments: compute threads, one batch each.

    Compute runs in threads so the replica's event loop keeps queueing the next batch.
    """

    _executor: ThreadPoolExecutor
    _lanes: int = 1

    def _start_executor(self, threads: int = 1) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="compute")

    def _batch_in_flight(self, groups_fn, settings: Settings):
        """``groups_fn`` as this replica's ``@serve.batch`` method, computing
        ``serve_encoder_batches_in_flight`` batches at once on as many threads."""
        in_flight = self._lanes = settings.serve_encoder_batches_in_flight
        self._start_executor(in_flight)
        # Built per replica, not decorated on the class: the decorator's concurrency comes from Settings.
        return serve.batch(max_concurrent_batches=in_flight)(groups_fn)

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _encoder_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"encoder_threads": settings.serve_encoder_threads})


@serve.deployment
class TextEncoder(_Batched):
    """``build_text_encoder`` behind a batched method: a group of texts → (n, dim) float32."""

    def __init__(self, settings: Settings) -> None:
        # lazy: each replica loads only its own deployment's libraries (the ingress never loads a model)
        from lib.features.encoders import build_text_encoder

        self.encoder = build_text_encoder(_encoder_settings(settings))
        self.encode = self._batch_in_flight(self._encode_groups, settings)

    def reconfigure(self, config: dict) -> None:
        _apply_batch_config(self.encode, config)

    def encoder_id(self) -> str:
        return self.encoder.id.key

    async def _encode_groups(self, groups: list[list[str]]) -> list[list[np.ndarray]]:
        rows = await self._compute(self.encoder.encode, [t for g in groups for t in g])
        return logic.split_groups(rows, [len(g) for g in groups])


@serve.deployment
class ImageEncoder(_Batched):
    """``build_image_encoder`` batched: a group of images → per image a row or an error."""

    def __init__(self, settings: Settings) -> None:
        # lazy: each replica loads only its own deployment's libraries
        from lib.features.encoders import build_image_encoder

        self.encoder = build_image_encoder(_encoder_settings(settings))
        self.encode = self._batch_in_flight(self._encode_groups, settings)
        self._batches_computing = 0

    def reconfigure(self, config: dict) -> None:
        _apply_batch_config(self.encode, config)

    def encoder_id(self) -> str:
        return self.encoder.id.key

    async def _encode_groups(self, groups: list[list[bytes]]) -> list[list[np.ndarray | str]]:
        flat = [image for g in groups for image in g]
        idle_lanes = max(self._lanes - self._batches_computing, 1)  # this batch's lane included
        chunks = logic.split_groups(flat, logic.chunk_sizes(len(flat), idle_lanes, IMAGE_CHUNK_MIN))
        self._batches_computing += 1  # the event loop's thread only: no lock
        try:
            parts = await asyncio.gather(
                *(self._compute(logic.encode_isolating, self.encoder.encode, chunk) for chunk in chunks)
            )
        finally:
            self._batches_computing -= 1
        return logic.split_groups([row for part in parts for row in part], [len(g) for g in groups])


@serve.deployment
class FusionModel(_Batched):
    """The production fusion head: hot-swapped on alias moves, batched, logging every prediction."""

    def __init__(self, settings: Settings) -> None:
        # lazy: torch and MLflow only in the model's replicas, not in the ingress or the encoders
        import mlflow
        import torch
        from mlflow import MlflowClient

        from lib.data.storage import put_table, s3_client
        from lib.features.encoders import encoder_ids, encoder_set_id
        from lib.ops.predlog import PredictionLogWriter

        torch.set_num_threads(1)  # a small MLP; leave the cores to the encoders
        mlflow.set_tracking_uri(settings.mlflow_uri)
        self.settings = settings
        self.name = settings.registered_model_name
        self.registry = MlflowClient(settings.mlflow_uri)
        text_id, image_id = encoder_ids(settings)  # the ids the encoder deployments run (same settings)
        self.running = logic.running_encoders(text_id.key, image_id.key, encoder_set_id(text_id, image_id))
        self.loaded = None  # LoadedModel; replaced whole, never mutated: a batch keeps the one it read
        self.refused: dict[str, str] = {}
        self.last_check_error: str | None = None
        s3 = s3_client(settings)
        self.log = PredictionLogWriter(
            lambda key, table: put_table(s3, settings.bucket_lake, key, table),
            settings.predlog_flush_rows,
            settings.predlog_flush_s,
            settings.predlog_max_buffer_rows,
            settings.predlog_spool,
        )
        self.batch_sizes = metrics.Histogram(
            "rakuten_model_batch_size", "Products per batch of the fusion head.", BATCH_SIZE_BUCKETS
        )
        self._start_executor()
        # Loaded before the replica takes traffic: a restarted or added replica answers with a model.
        self.check_alias()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()

    def reconfigure(self, config: dict) -> None:
        _apply_batch_config(self.predict, config)

    def check_alias(self) -> None:
        """Load the version behind ``production`` if it moved; keep the current one on any problem."""
        # lazy: see __init__ (torch + MLflow only in this deployment's replicas)
        from lib.model import registry

        try:
            target = registry.version_by_alias(self.registry, self.name, registry.PRODUCTION)
            current = self.loaded.version if self.loaded is not None else None
            if target is None or target.version == current or target.version in self.refused:
                return
            candidate = registry.load_version(self.registry, self.name, target.version)
            reason = logic.incompatibility(candidate.card, self.running)
            if reason is not None:
                self.refused[target.version] = reason
                logger.warning(
                    "refusing %s version %s: %s; still serving version %s", self.name, target.version,
                    reason, current,
                )  # fmt: skip
                return
            self.loaded = candidate  # the atomic swap: one reference assignment
            self.last_check_error = None
            logger.info("now serving %s version %s (was %s)", self.name, target.version, current)
        except Exception as exc:  # MLflow or S3 unreachable: retry at the next poll
            self.last_check_error = f"{type(exc).__name__}: {exc}"
            logger.warning("checking @%s of %s failed: %s", registry.PRODUCTION, self.name, exc)

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.serve_model_poll_s):
            self.check_alias()

    def info(self) -> dict:
        loaded = self.loaded
        return {
            "model_name": self.name,
            "model_version": loaded.version if loaded is not None else None,
            "alias": "production",
            **self.running,
            "refused_versions": dict(self.refused),
            "registry_error": self.last_check_error,
            "prediction_log": self.log.stats(),
        }

    @serve.batch
    async def predict(
        self,
        texts: list[list | None],
        images: list[list | None],
        metas: list[list[dict]],
        product_texts: list[list[str]],
    ) -> list[list[dict]]:
        """Groups of products (encoder outputs for the items that have each modality, and every
        product's text for a head with a TF-IDF branch) → results."""
        loaded = self.loaded  # one model for the whole batch, even if a swap lands meanwhile
        if loaded is None:
            return [[logic.error_result(503, MODEL_NOT_LOADED)] * len(m) for m in metas]
        text_rows, image_rows = [], []
        for group_texts, group_images, group_metas in zip(texts, images, metas, strict=True):
            t, i = logic.align_group(group_metas, group_texts, group_images)
            text_rows += t
            image_rows += i
        flat_metas = [m for group in metas for m in group]
        flat_texts = [t for group in product_texts for t in group]
        results = await self._compute(self._predict, loaded, text_rows, image_rows, flat_metas, flat_texts)
        return logic.split_groups(results, [len(m) for m in metas])

    def _predict(
        self, loaded, texts: list, images: list, metas: list[dict], product_texts: list[str]
    ) -> list[dict]:
        # lazy: see __init__
        from lib.model.artifact import input_dims
        from lib.ops.predlog import log_row

        results: list[dict] = [{}] * len(metas)
        ok = [i for i, image in enumerate(images) if not isinstance(image, str)]
        for i, image in enumerate(images):
            if isinstance(image, str):
                results[i] = logic.error_result(422, image)
        if not ok:
            return results
        text_dim, image_dim = input_dims(loaded.card)
        text = logic.stack_inputs([texts[i] for i in ok], text_dim)  # (n, text_dim)
        image = logic.stack_inputs([images[i] for i in ok], image_dim)  # (n, image_dim)
        lexical = [product_texts[i] for i in ok]  # read only by a head that reads the text
        probs = loaded.probabilities(text, image, lexical)
        self.batch_sizes.observe(len(ok))
        answered, rows = time.time(), []
        for row, i in enumerate(ok):
            results[i] = logic.prediction(
                probs[row], loaded.card, self.settings.abstain_threshold, self.name, loaded.version
            )
            meta = metas[i]
            latency_ms = (answered - meta["received_at"]) * 1000
            rows.append(log_row(results[i], text[row], image[row], meta["has_text"], meta["has_image"],
                                meta["input_hash"], latency_ms=latency_ms, batch_size=len(ok)))  # fmt: skip
        self.log.add(rows)
        return results

    def __del__(self) -> None:
        self._stop.set()
        self.log.close(timeout_s=self.settings.predlog_flush_s)


api = FastAPI(title="Rakuten product classification", version="1")


@api.exception_handler(logic.InputError)
async def _input_error(request: Request, exc: logic.InputError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front door: parse and validate, then await the encoder and model handles (no CPU work)."""

    def __init__(
        self,
        settings: Settings,
        text: DeploymentHandle,
        image: DeploymentHandle,
        model: DeploymentHandle,
    ) -> None:
        self.settings = settings
        self.token = settings.serve_auth_token.get_secret_value() if settings.serve_auth_token else None
        self.text, self.image, self.model = text, image, model
        # Ray's metrics endpoint exports these (prefixed ray_) beside Serve's own request metrics.
        self.requests = metrics.Counter(
            "rakuten_requests", "Prediction requests by route and HTTP status.", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "rakuten_request_latency_ms", "Prediction latency.", LATENCY_BUCKETS_MS, tag_keys=("route",)
        )

    def _observe(self, route: str, started: float, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})

    async def _body(self, request: Request) -> bytes:
        if not authorized(request.headers.get("authorization"), self.token):
            raise logic.InputError(401, "missing or wrong bearer token")
        limit = self.settings.serve_max_body_bytes
        logic.check_declared_length(request.headers.get("content-length"), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise logic.InputError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def reconfigure(self, config: dict) -> None:
        _apply_batch_config(self._batched, config)

    async def _pipeline_once(self, items: list[logic.PredictInput]) -> list[dict]:
        texts = [item.text for item in items if item.has_text]
        images = [item.image for item in items if item.has_image]
        # Responses are handed on unresolved: the embeddings go encoder → model, not through here.
        text = self.text.encode.remote(texts) if texts else None
        image = self.image.encode.remote(images) if images else None
        cap = self.settings.lexical_max_chars
        metas, lexical_texts = [item.meta() for item in items], [item.lexical_text(cap) for item in items]
        return await self.model.predict.remote(text, image, metas, lexical_texts)

    async def _pipeline(self, items: list[logic.PredictInput]) -> list[dict]:
        """A group of products through the encoders and the head; retried while a dead replica is replaced."""
        deadline = time.monotonic() + self.settings.serve_retry_deadline_s
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await self._pipeline_once(items)
            except RayActorError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("replica lost (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    @serve.batch(max_concurrent_batches=INGRESS_BATCHES_IN_FLIGHT)
    async def _batched(self, items: list[logic.PredictInput]) -> list[dict]:
        """Concurrent /predict requests travel together: one handle call per deployment per batch."""
        return await self._pipeline(items)

    @staticmethod
    def _respond(result: dict) -> JSONResponse:
        if "error" in result:
            return JSONResponse({"detail": result["error"]["detail"]}, status_code=result["error"]["status"])
        return JSONResponse(result)

    async def _measured(self, route: str, handle, request: Request) -> JSONResponse:
        """``handle(request)`` counted and timed by route and status (an error is counted, then raised)."""
        started, status = time.perf_counter(), 500
        try:
            response = await handle(request)
            status = response.status_code
            return response
        except logic.InputError as exc:
            status = exc.status
            raise
        finally:
            self._observe(route, started, status)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        return await self._measured("/predict", self._predict_one, request)

    async def _predict_one(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        item = await asyncio.to_thread(
            logic.parse_predict, body, request.headers.get("content-type"), self.settings
        )
        return self._respond(await self._batched(item))

    @api.post("/predict/batch")
    async def predict_batch(self, request: Request) -> JSONResponse:
        return await self._measured("/predict/batch", self._predict_many, request)

    async def _predict_many(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        items = await asyncio.to_thread(
            logic.parse_batch, body, request.headers.get("content-type"), self.settings
        )
        results = await self._pipeline(items)
        for i, result in enumerate(results):
            if "error" in result:
                detail = f"item {i}: {result['error']['detail']}"
                return JSONResponse({"detail": detail}, status_code=result["error"]["status"])
        return JSONResponse(list(results))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            info = await self.model.info.remote()
        except Exception as exc:  # the model replica is being replaced: not healthy right now
            info = {"model_error": f"{type(exc).__name__}: {exc}"}
        status, body = logic.health(info)
        return JSONResponse(body, status_code=status)


def build_app(settings: Settings, max_batch_size: int | None = None):
    """The application graph; ``max_batch_size`` overrides Settings (it only changes ``user_config``)."""
    check_exposure(settings, ["serve"])  # beyond loopback, only with a token
    user_configs = batch_configs(settings, max_batch_size)
    autoscaled = {
        "max_ongoing_requests": settings.serve_max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": settings.serve_min_replicas,
            "max_replicas": settings.serve_max_replicas,
            "target_ongoing_requests": settings.serve_target_ongoing_requests,
        },
    }
    encoder_cpus = {"num_cpus": settings.serve_encoder_cpus}
    text = TextEncoder.options(
        ray_actor_options=encoder_cpus, user_config=user_configs["TextEncoder"], **autoscaled
    ).bind(settings)
    image = ImageEncoder.options(
        ray_actor_options=encoder_cpus, user_config=user_configs["ImageEncoder"], **autoscaled
    ).bind(settings)
    model = FusionModel.options(
        ray_actor_options={"num_cpus": settings.serve_model_cpus},
        user_config=user_configs["FusionModel"],
        **autoscaled,
    ).bind(settings)
    return Ingress.options(
        ray_actor_options={"num_cpus": settings.serve_ingress_cpus},
        max_ongoing_requests=settings.serve_max_ongoing_requests,
        user_config=user_configs["Ingress"],
    ).bind(settings, text, image, model)


def app_builder(args: dict):
    """Entry for ``serve deploy serve/config.yaml`` (settings from the cluster's environment)."""
    return build_app(get_settings())
