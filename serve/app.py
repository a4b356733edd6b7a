"""The Ray Serve application: HTTP ingress replicas that encode the text and run the fusion head
themselves, beside a batched image-encoder deployment.

```
HTTP (HAProxy) → Ingress replicas (route, parse + validate; @serve.batch groups concurrent requests)
                   ├─ ImageEncoder.encode  @serve.batch  (a handle call per batch with images)
                   └─ in the replica: text encoder, production head, prediction log
```

A text request crosses no Ray hop at all: HAProxy spreads requests over the ingress replicas, and each
batch is encoded and scored in the replica that parsed it. Images go to the image-encoder deployment
(its own replicas, autoscaled), one handle call per batch, so Serve's per-call cost (routing,
serialisation, an actor task) is paid once per batch, not per request. Each ingress replica serves the
registry alias ``production``: it loads it before taking traffic, then a background thread polls the
alias and swaps the model atomically when it moves. Batch sizes and wait timeouts are every
deployment's ``user_config`` (changed at runtime without restarting replicas).
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from lib.ops.exposure import authorized, check_exposure
from lib.settings import Settings, get_settings
from serve import logic

logger = logging.getLogger("ray.serve")
MODEL_NOT_LOADED = "no production model loaded yet"
RETRY_FIRST_DELAY_S, RETRY_MAX_DELAY_S = 0.1, 2.0
INNER_DEPLOYMENTS = ("ImageEncoder",)
# An image batch is split over the lanes no other batch holds, down to this many images per chunk: the
# image encoder's cost per image does not fall with the batch size (unlike the text encoder's), so at low
# load splitting cuts latency; under load every lane has its own batch and nothing is split.
IMAGE_CHUNK_MIN = 2
# Histogram buckets of the custom metrics (Ray's metrics endpoint).
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


def batch_configs(settings: Settings, max_batch_size: int | None = None) -> dict[str, dict]:
    """The ``user_config`` of each deployment: the ingress forms batches, the image encoder coalesces them."""
    size = max_batch_size or settings.serve_max_batch_size
    configs = {
        "Ingress": {"max_batch_size": size, "batch_wait_timeout_s": settings.serve_batch_wait_timeout_s}
    }
    inner = {"max_batch_size": size, "batch_wait_timeout_s": settings.serve_inner_batch_wait_timeout_s}
    return configs | dict.fromkeys(INNER_DEPLOYMENTS, inner)


def _apply_batch_config(method: Any, config: dict) -> None:
    method.set_max_batch_size(int(config["max_batch_size"]))
    method.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))


def _encoder_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"encoder_threads": settings.serve_encoder_threads})


class _Computing:
    """Compute threads, one batch each: the replica's event loop keeps queueing the next batch meanwhile
    (ONNX Runtime and BLAS release the GIL, so the lanes run in parallel)."""

    _executor: ThreadPoolExecutor
    _lanes: int = 1

    def _start_lanes(self, settings: Settings) -> None:
        self._lanes = settings.serve_encoder_batches_in_flight
        self._executor = ThreadPoolExecutor(self._lanes, thread_name_prefix="compute")

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


@serve.deployment
class ImageEncoder(_Computing):
    """``build_image_encoder`` batched: a group of images → per image a row or an error."""

    def __init__(self, settings: Settings) -> None:
        # lazy: each replica loads only its own deployment's libraries
        from lib.features.encoders import build_image_encoder

        self.encoder = build_image_encoder(_encoder_settings(settings))
        self._start_lanes(settings)
        # Built per replica, not decorated on the class: the decorator's concurrency comes from Settings.
        self.encode = serve.batch(max_concurrent_batches=self._lanes)(self._encode_groups)
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


class ProductionScorer:
    """What an ingress replica computes itself: the text encoder, the production head (hot-swapped when
    the registry alias moves) and the prediction log. Called from the replica's compute threads."""

    def __init__(self, settings: Settings) -> None:
        # lazy: torch, MLflow and the encoders load in the replica, not where the app graph is built
        import mlflow
        import torch
        from mlflow import MlflowClient

        from lib.data.storage import put_table, s3_client
        from lib.features.encoders import build_text_encoder, encoder_ids, encoder_set_id
        from lib.ops.predlog import PredictionLogWriter

        torch.set_num_threads(1)  # a small MLP per batch; the lanes are the parallelism
        mlflow.set_tracking_uri(settings.mlflow_uri)
        self.settings = settings
        self.name = settings.registered_model_name
        self.registry = MlflowClient(settings.mlflow_uri)
        self.text_encoder = build_text_encoder(_encoder_settings(settings))
        text_id, image_id = encoder_ids(settings)  # the ids the image deployment runs too (same settings)
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
        # Loaded before the replica takes traffic: a restarted or added replica answers with a model.
        self.check_alias()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()

    def check_alias(self) -> None:
        """Load the version behind ``production`` if it moved; keep the current one on any problem."""
        # lazy: see __init__
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

    def encode_texts(self, items: list[logic.PredictInput]) -> list[np.ndarray | None]:
        """Per item its text embedding (None for an item without text)."""
        texts = [item.text for item in items if item.has_text]
        rows = self.text_encoder.encode(texts) if texts else ()
        return logic.scatter([item.has_text for item in items], rows)

    def score(self, loaded, items: list[logic.PredictInput], texts: list, images: list) -> list[dict]:
        """A batch's results from per-item embeddings (an image row may be an error string), each
        prediction logged with its inputs' embeddings and timings."""
        # lazy: see __init__
        from lib.model.artifact import input_dims
        from lib.ops.predlog import log_row

        results: list[dict] = [{}] * len(items)
        ok = [i for i, image in enumerate(images) if not isinstance(image, str)]
        for i, image in enumerate(images):
            if isinstance(image, str):
                results[i] = logic.error_result(422, image)
        if not ok:
            return results
        text_dim, image_dim = input_dims(loaded.card)
        text = logic.stack_inputs([texts[i] for i in ok], text_dim)  # (n, text_dim)
        image = logic.stack_inputs([images[i] for i in ok], image_dim)  # (n, image_dim)
        cap = self.settings.lexical_max_chars
        lexical = [items[i].lexical_text(cap) for i in ok]  # read only by a head that reads the text
        probs = loaded.probabilities(text, image, lexical)
        self.batch_sizes.observe(len(ok))
        answered, rows = time.time(), []
        for row, i in enumerate(ok):
            results[i] = logic.prediction(
                probs[row], loaded.card, self.settings.abstain_threshold, self.name, loaded.version
            )
            item = items[i]
            latency_ms = (answered - item.received_at) * 1000
            rows.append(log_row(results[i], text[row], image[row], item.has_text, item.has_image,
                                item.input_hash, latency_ms=latency_ms, batch_size=len(ok)))  # fmt: skip
        self.log.add(rows)
        return results

    def close(self) -> None:
        """Stop polling the alias and flush the prediction log."""
        self._stop.set()
        self.log.close(timeout_s=self.settings.predlog_flush_s)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


@serve.deployment
class Ingress(_Computing):
    """HTTP front door: parse and validate, encode the text and score in this replica; images go to the
    image-encoder deployment."""

    def __init__(self, settings: Settings, image: DeploymentHandle) -> None:
        self.settings = settings
        self.token = settings.serve_auth_token.get_secret_value() if settings.serve_auth_token else None
        self.image = image
        self.scorer = ProductionScorer(settings)
        self._start_lanes(settings)
        in_flight = settings.serve_ingress_batches_in_flight
        self._batched = serve.batch(max_concurrent_batches=in_flight)(self._batch_groups)
        self._post_routes = {"/predict": self._predict_one, "/predict/batch": self._predict_many}
        # Ray's metrics endpoint exports these (prefixed ray_) beside Serve's own request metrics.
        self.requests = metrics.Counter(
            "rakuten_requests", "Prediction requests by route and HTTP status.", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "rakuten_request_latency_ms", "Prediction latency.", LATENCY_BUCKETS_MS, tag_keys=("route",)
        )

    def reconfigure(self, config: dict) -> None:
        _apply_batch_config(self._batched, config)

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

    async def _encode_images(self, items: list[logic.PredictInput]) -> list:
        """Per item its image row, an error string, or None; retried while a dead replica is replaced."""
        images = [item.image for item in items if item.has_image]
        if not images:
            return [None] * len(items)
        deadline = time.monotonic() + self.settings.serve_retry_deadline_s
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                rows = await self.image.encode.remote(images)
                return logic.scatter([item.has_image for item in items], rows)
            except RayActorError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("image replica lost (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    async def _pipeline(self, items: list[logic.PredictInput]) -> list[dict]:
        """A group of products: images encoded remotely while this replica encodes the texts; then scored."""
        loaded = self.scorer.loaded  # one model for the whole group, even if a swap lands meanwhile
        if loaded is None:
            return [logic.error_result(503, MODEL_NOT_LOADED)] * len(items)
        images = asyncio.ensure_future(self._encode_images(items))
        try:
            texts = await self._compute(self.scorer.encode_texts, items)
        except BaseException:
            images.cancel()  # else its result or error would be left unretrieved
            raise
        return await self._compute(self.scorer.score, loaded, items, texts, await images)

    async def _batch_groups(self, items: list[logic.PredictInput]) -> list[dict]:
        """Concurrent /predict requests travel together: one text-encoder run and one image call per batch."""
        return await self._pipeline(items)

    @staticmethod
    def _respond(result: dict) -> JSONResponse:
        if "error" in result:
            return JSONResponse({"detail": result["error"]["detail"]}, status_code=result["error"]["status"])
        return JSONResponse(result)

    async def __call__(self, request: Request) -> JSONResponse:
        """Route by path and method. Three routes need no web framework: FastAPI's routing, dependency
        resolution and middleware cost ~9% of the text throughput (interleaved rounds on the bench stack)."""
        path = request.url.path
        if path == "/health":
            return self._health() if request.method == "GET" else _error(405, "Method Not Allowed")
        handle = self._post_routes.get(path)
        if handle is None:
            return _error(404, "Not Found")
        if request.method != "POST":
            return _error(405, "Method Not Allowed")
        return await self._measured(path, handle, request)

    async def _measured(self, route: str, handle, request: Request) -> JSONResponse:
        """``handle(request)`` counted and timed by route and status; errors become JSON responses."""
        started = time.perf_counter()
        try:
            response = await handle(request)
        except logic.InputError as exc:
            response = _error(exc.status, exc.detail)
        except Exception as exc:
            logger.exception("unexpected error on %s", route)
            response = _error(500, f"internal error: {type(exc).__name__}")
        self._observe(route, started, response.status_code)
        return response

    async def _predict_one(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        item = await asyncio.to_thread(
            logic.parse_predict, body, request.headers.get("content-type"), self.settings
        )
        return self._respond(await self._batched(item))

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

    def _health(self) -> JSONResponse:
        status, body = logic.health(self.scorer.info())
        return JSONResponse(body, status_code=status)

    def __del__(self) -> None:
        self.scorer.close()


def build_app(settings: Settings, max_batch_size: int | None = None):
    """The application graph; ``max_batch_size`` overrides Settings (it only changes ``user_config``)."""
    check_exposure(settings, ["serve"])  # beyond loopback, only with a token
    user_configs = batch_configs(settings, max_batch_size)
    image = ImageEncoder.options(
        ray_actor_options={"num_cpus": settings.serve_image_encoder_cpus},
        user_config=user_configs["ImageEncoder"],
        max_ongoing_requests=settings.serve_max_ongoing_requests,
        autoscaling_config={
            "min_replicas": settings.serve_min_replicas,
            "max_replicas": settings.serve_max_replicas,
            "target_ongoing_requests": settings.serve_target_ongoing_requests,
        },
    ).bind(settings)
    return Ingress.options(
        ray_actor_options={"num_cpus": settings.serve_ingress_cpus},
        num_replicas=settings.serve_ingress_replicas,
        max_ongoing_requests=settings.serve_max_ongoing_requests,
        user_config=user_configs["Ingress"],
    ).bind(settings, image)


def app_builder(args: dict):
    """Entry for ``serve deploy serve/config.yaml`` (settings from the cluster's environment)."""
    return build_app(get_settings())
