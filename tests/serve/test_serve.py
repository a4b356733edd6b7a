"""The Serve application end to end on the test stack: real Ray Serve, real encoders, the real MLflow
registry and real S3, with a production model trained by the real pipeline (conftest.production_model).

The app serves its own registered model name, so it can start before any version exists (503), then
get version 1 (a copy of the pipeline's model), a promotion during traffic, a refused version, a
rollback and a killed replica. Serve is shut down at the end so later modules get a quiet cluster.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from pydantic import SecretStr

from lib.data import lake
from lib.data.storage import get_bytes
from lib.data.text import clean_text
from lib.features.embed import PRODUCT_COLUMNS, embedding_inputs, read_embeddings
from lib.features.encoders import encoder_ids, encoder_set_id
from lib.model import registry
from lib.model.artifact import LoadedModel, write_model_dir
from lib.ops import predlog
from lib.ops import stack as stack_mod
from serve import logic

TOKEN = "serve-test-token"
REPLICA_PREFIX = "SERVE_REPLICA::"
WAIT_S = 60


def wait_for(predicate: Callable[[], object], timeout_s: float = WAIT_S, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every_s)


def jpeg(size: int = 96, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def register_copy(settings, source: LoadedModel, card: dict | None = None) -> str:
    """A new version of the serving test model (its weights, TF-IDF block and card, or another card)."""
    import mlflow

    card = card or source.card
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_experiment(settings.mlflow_experiment)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name="serve-test-copy"):
        state_dict = source.model.state_dict() if source.model is not None else None
        model_dir = write_model_dir(Path(tmp) / "model", state_dict, card, source.lexical, source.ensemble)
        info = registry.log_model(model_dir, card, [])
    return mlflow.register_model(info.model_uri, settings.registered_model_name).version


class Stream:
    """Clients posting requests (text-only, or with ``image``) in background threads; records status and
    model version."""

    def __init__(self, settings, threads: int = 2, image: bytes | None = None) -> None:
        self.results: list[tuple[float, int, str | None]] = []
        self._image = {"image": base64.b64encode(image).decode()} if image else {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(settings, i)) for i in range(threads)]

    def _run(self, settings, worker: int) -> None:
        with client(settings) as http:
            i = 0
            while not self._stop.is_set():
                try:
                    body = {"designation": f"Livre de poche tome {worker}-{i}", **self._image}
                    resp = http.post("/predict", json=body)
                    version = resp.json().get("model_version") if resp.status_code == 200 else None
                    self.results.append((time.monotonic(), resp.status_code, version))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), -1, repr(exc)))
                i += 1

    def __enter__(self) -> Stream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def since(self, t: float) -> list:
        return [r for r in self.results if r[0] > t]


def client(settings, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=settings.serve_url, headers=headers, timeout=WAIT_S)


def health(settings) -> tuple[int, dict]:
    resp = httpx.get(f"{settings.serve_url}/health", timeout=WAIT_S)
    return resp.status_code, resp.json()


def served_version(settings, version: str) -> bool:
    status, body = health(settings)
    return status == 200 and body["model_version"] == version


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_settings(stack):
    return stack.model_copy(
        update={
            "registered_model_name": f"{stack.registered_model_name}-serve-test",
            "serve_auth_token": SecretStr(TOKEN),
            "serve_model_poll_s": 0.5,
            "serve_max_replicas": 1,
            "serve_ingress_replicas": 1,  # /health then describes the replica that answered every request
            "predlog_flush_rows": 8,
            "predlog_flush_s": 0.5,
            "max_image_bytes": 200_000,
            "serve_max_body_bytes": 400_000,
            "serve_max_batch_items": 8,
        }
    )


@pytest.fixture(scope="module")
def source_model(production_model, stack) -> LoadedModel:
    """The pipeline's production model (weights + card), copied into the serving test model."""
    import mlflow

    mlflow.set_tracking_uri(stack.mlflow_uri)  # models:/ downloads use the global tracking URI
    mlflow_client = MlflowClient(stack.mlflow_uri)
    version = registry.version_by_alias(mlflow_client, stack.registered_model_name, registry.PRODUCTION)
    loaded = registry.load_version(mlflow_client, stack.registered_model_name, version.version)
    assert loaded.lexical is not None  # the serving tests cover a head that reads the product text
    return loaded


@pytest.fixture(scope="module")
def app(ray_cluster, serve_settings, source_model):
    """The app deployed while its model name has no version at all."""
    from ray import serve

    from serve.app import build_app

    mlflow_client = MlflowClient(serve_settings.mlflow_uri)
    name = serve_settings.registered_model_name
    if mlflow_client.search_registered_models(f"name='{name}'"):
        mlflow_client.delete_registered_model(name)
    serve.start(http_options={"host": serve_settings.host, "port": serve_settings.serve_port})
    t0 = time.monotonic()
    serve.run(build_app(serve_settings), name=serve_settings.serve_app_name, route_prefix="/")
    print(f"serve app up in {time.monotonic() - t0:.1f} s")
    try:
        yield serve_settings
    finally:
        serve.shutdown()
        if mlflow_client.search_registered_models(f"name='{name}'"):
            mlflow_client.delete_registered_model(name)


@pytest.fixture(scope="module")
def before_model(app) -> dict:
    """Responses while no production version exists."""
    with client(app) as http:
        predict = http.post("/predict", json={"designation": "Livre"})
    return {"health": health(app), "predict": (predict.status_code, predict.json())}


@pytest.fixture(scope="module")
def started_at() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def v1(app, before_model, source_model, started_at) -> str:
    """Version 1 registered and promoted; returns once the app serves it."""
    version = register_copy(app, source_model)
    registry.promote(MlflowClient(app.mlflow_uri), app.registered_model_name, version)
    wait_for(lambda: served_version(app, version))
    return version


@pytest.fixture
def http(app):
    with client(app) as c:
        yield c


# --- tests --------------------------------------------------------------------------------------------


def test_health_and_predict_are_503_before_any_production_model(before_model):
    status, body = before_model["health"]
    assert status == 503 and body["status"] == logic.WAITING and body["model_version"] is None
    status, body = before_model["predict"]
    assert status == 503 and "no production model" in body["detail"]


def test_health_once_a_model_is_promoted(v1, app, source_model):
    status, body = health(app)
    assert status == 200 and body["status"] == "ok"
    assert body["model_name"] == app.registered_model_name and body["model_version"] == v1
    assert body["alias"] == registry.PRODUCTION
    for key in ("encoder_set_id", "text_encoder", "image_encoder"):
        assert body[key] == source_model.card[key]


def check_prediction(result: dict, card: dict, version: str, threshold: float) -> None:
    assert result["prdtypecode"] in card["codes"] and result["class_name"]
    top = result["top5"]
    assert len(top) == 5 and [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert top[0]["prdtypecode"] == result["prdtypecode"] and top[0]["score"] == result["confidence"]
    assert 0 < result["confidence"] <= 1 and result["abstained"] == (result["confidence"] < threshold)
    assert result["model_version"] == version


def test_multipart_json_text_only_and_image_only(v1, http, app, source_model):
    card, threshold = source_model.card, app.abstain_threshold
    form = {
        "designation": "Piscine tubulaire <b>Intex</b>",
        "description": "Une piscine hors sol &amp; sa pompe",
    }
    image = jpeg()
    requests = {
        "multipart": {"data": form, "files": {"image": ("p.jpg", image, "image/jpeg")}},
        "multipart text-only": {"data": form, "files": {"unused": ("x.txt", b"", "text/plain")}},
        "json": {"json": {**form, "image_base64": base64.b64encode(image).decode()}},
        "json text-only": {"json": {"designation": "Livre de poche"}},
        "json image-only": {"json": {"image_base64": base64.b64encode(image).decode()}},
        "multipart image-only": {"files": {"image": ("p.jpg", image, "image/jpeg")}},
    }
    results = {}
    for name, kwargs in requests.items():
        resp = http.post("/predict", **kwargs)
        assert resp.status_code == 200, (name, resp.text)
        check_prediction(resp.json(), card, v1, threshold)
        results[name] = resp.json()
    # The same product as a form and as JSON: the same answer.
    scores = {name: [t["score"] for t in r["top5"]] for name, r in results.items()}
    assert scores["multipart"] == pytest.approx(scores["json"], abs=1e-5)


def test_batch_endpoint_answers_in_order(v1, http, app, source_model):
    items = [
        {"designation": "Livre de poche"},
        {"image_base64": base64.b64encode(jpeg(seed=3)).decode()},
        {"designation": "Console de jeux", "description": "PS4 avec manette"},
    ]
    resp = http.post("/predict/batch", json=items)
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    assert len(batch) == len(items)
    for item, result in zip(items, batch, strict=True):
        check_prediction(result, source_model.card, v1, app.abstain_threshold)
        single = http.post("/predict", json=item).json()
        assert result["prdtypecode"] == single["prdtypecode"]
        assert result["confidence"] == pytest.approx(single["confidence"], abs=1e-5)


def bad_requests() -> dict[str, tuple[dict, int]]:
    image = jpeg(256, seed=1)
    truncated = image[: len(image) // 2]  # a valid header, then the data stops
    utf8 = "application/json"
    return {
        "body too large": ({"content": b"x" * 500_000, "headers": {"content-type": utf8}}, 413),
        "image too large": ({"files": {"image": ("p.jpg", image + b"\0" * 250_000, "image/jpeg")}}, 413),
        "not an image": ({"files": {"image": ("p.jpg", b"%PDF-1.4 hello", "image/jpeg")}}, 415),
        "corrupt image": ({"files": {"image": ("p.jpg", truncated, "image/jpeg")}}, 422),
        "bad base64": ({"json": {"image_base64": "%%% not base64"}}, 422),
        "invalid utf-8 json": (
            {"content": b'{"designation": "caf\xe9"}', "headers": {"content-type": utf8}},
            422,
        ),
        "invalid utf-8 field": (
            {"data": {"designation": b"caf\xe9"}, "files": {"x": ("x", b"", "text/plain")}},
            422,
        ),
        "empty body": ({"content": b"", "headers": {"content-type": utf8}}, 422),
        "nothing to classify": ({"json": {"designation": "", "description": None}}, 422),
        "invalid json": ({"content": b"{designation", "headers": {"content-type": utf8}}, 422),
        "unsupported type": ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    }


def test_bad_inputs_get_clear_json_errors_and_the_service_keeps_serving(v1, http, app):
    for name, (kwargs, expected) in bad_requests().items():
        resp = http.post("/predict", **kwargs)
        assert resp.status_code == expected, (name, resp.text)
        assert resp.headers["content-type"].startswith("application/json")
        assert isinstance(resp.json()["detail"], str) and resp.json()["detail"], name
    too_many = [{"designation": "x"}] * (app.serve_max_batch_items + 1)
    assert http.post("/predict/batch", json=too_many).status_code == 413
    assert http.post("/predict/batch", json=[{"designation": "x"}, {}]).status_code == 422
    wrong_routes = (("GET", "/predict", 405), ("POST", "/health", 405), ("POST", "/nope", 404))
    for method, path, expected in wrong_routes:
        resp = http.request(method, path)
        assert resp.status_code == expected and resp.json()["detail"], (method, path)
    # A corrupt image inside a batch fails the batch with its index; good items elsewhere are unaffected.
    corrupt = base64.b64encode(jpeg(256, seed=1)[:2000]).decode()
    resp = http.post("/predict/batch", json=[{"designation": "Livre"}, {"image_base64": corrupt}])
    assert resp.status_code == 422 and resp.json()["detail"].startswith("item 1")
    assert health(app)[0] == 200
    assert http.post("/predict", json={"designation": "Livre de poche"}).status_code == 200


def test_bearer_token_is_enforced_when_configured(v1, app):
    for token in (None, "wrong"):
        with client(app, token) as http:
            resp = http.post("/predict", json={"designation": "Livre"})
            assert resp.status_code == 401 and resp.json()["detail"]
            assert http.post("/predict/batch", json=[{"designation": "Livre"}]).status_code == 401
    assert health(app)[0] == 200  # health stays open for probes


def refuses_a_call_without_the_token(port: int) -> bool:
    """Whether a Serve replica's gRPC server answers a request without Ray's token, or with a wrong one,
    by UNAUTHENTICATED (reached by this machine's network address: the port listens on every interface)."""
    import grpc
    from ray._private.services import node_ip_address_from_perspective

    address = node_ip_address_from_perspective()
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        codes = []
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            try:
                call(b"", metadata=metadata, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    return codes == [grpc.StatusCode.UNAUTHENTICATED] * 2


def test_every_listening_socket_is_on_the_stack_host_and_the_dashboard_asks_for_the_token(v1, app):
    """Every process the stack started (and Ray's daemons, workers, Serve proxy and replicas under it)
    listens on the configured host only, or is a Serve replica's gRPC server that refuses a client without
    Ray's token; the dashboard, which forwards predictions to Serve with the
    token, asks for that token too (HTTP basic auth for a browser, or a bearer token)."""
    stack_mod.up(app, ["dash"], echo=lambda *_: None)  # the dashboard as `make up` runs it, with the token
    try:
        sockets = stack_mod.listening_sockets(app)
        assert {row["service"] for row in sockets} == {"s3", "mlflow", "ray", "dash"}, sockets
        ray_processes = {row["process"] for row in sockets if row["service"] == "ray"}
        assert {"gcs_server", "raylet"} <= ray_processes, ray_processes
        assert any(row["port"] == app.serve_port for row in sockets), "Serve's proxy is not under the stack"
        # The ingress replicas' own HTTP servers (behind HAProxy) take their ports from this stack's range.
        replica_ports = {row["port"] for row in sockets if row["process"].startswith("ray::ServeReplica")}
        in_range = replica_ports & set(app.serve_replica_http_ports)
        assert len(in_range) == app.serve_ingress_replicas, replica_ports
        # Ray 2.60 binds each Serve replica's gRPC server to [::] (hard-coded); Ray's token guards it.
        elsewhere = [row for row in sockets if row["address"] != app.host]
        assert all(row["process"].startswith("ray::ServeReplica") for row in elsewhere), elsewhere
        assert all(refuses_a_call_without_the_token(row["port"]) for row in elsewhere), elsewhere
        url = f"{app.dash_url}/"
        refused = httpx.get(url, timeout=10)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert httpx.post(f"{app.dash_url}/_dash-update-component", json={}, timeout=10).status_code == 401
        assert httpx.get(url, auth=("anyone", "wrong"), timeout=10).status_code == 401
        assert httpx.get(url, auth=("anyone", TOKEN), timeout=10).status_code == 200
        assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    finally:
        stack_mod.down(app, ["dash"], echo=lambda *_: None)


def test_promotion_during_traffic_swaps_without_a_failed_request(v1, app, source_model):
    mlflow_client = MlflowClient(app.mlflow_uri)
    with Stream(app) as stream:
        wait_for(lambda: len(stream.results) >= 10)
        v2 = register_copy(app, source_model)
        registry.promote(mlflow_client, app.registered_model_name, v2)
        wait_for(lambda: any(r[2] == v2 for r in stream.results))
        first_v2 = next(r[0] for r in stream.results if r[2] == v2)
        wait_for(lambda: len(stream.since(first_v2)) >= 10)
    failures = [r for r in stream.results if r[1] != 200]
    assert not failures, failures[:5]
    versions = [r[2] for r in sorted(stream.results)]
    assert versions[0] == v1 and versions[-1] == v2
    assert all(v == v2 for v in versions[versions.index(v2) :])  # one replica: never back to v1
    assert served_version(app, v2)


def test_a_model_for_other_encoders_is_refused_and_rollback_is_followed(v1, app, source_model):
    mlflow_client = MlflowClient(app.mlflow_uri)
    serving = health(app)[1]["model_version"]
    card = {**source_model.card, "encoder_set_id": "000000000000", "text_encoder": "other@1/512/x"}
    v3 = register_copy(app, source_model, card)
    registry.promote(mlflow_client, app.registered_model_name, v3)
    body = wait_for(lambda: (b := health(app)[1]).get("refused_versions", {}).get(v3) and b)
    assert "encoder_set_id" in body["refused_versions"][v3]
    assert body["model_version"] == serving
    with client(app) as http:
        assert http.post("/predict", json={"designation": "Livre"}).json()["model_version"] == serving
    new_production, _ = registry.rollback(mlflow_client, app.registered_model_name)
    assert new_production == serving
    time.sleep(3 * app.serve_model_poll_s)
    assert served_version(app, serving)


def test_fault_a_killed_image_encoder_replica_is_replaced_while_requests_keep_succeeding(
    v1, app, ray_cluster
):
    """Killed mid-stream, the image encoder's replica is replaced; the ingress retries its calls meanwhile."""

    def replicas(deployment: str) -> list[str]:
        prefix = f"{REPLICA_PREFIX}{app.serve_app_name}#{deployment}#"
        return [
            a["name"]
            for a in ray_cluster.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)
        ]

    (victim,) = replicas("ImageEncoder")
    with Stream(app, image=jpeg()) as stream:
        wait_for(lambda: len(stream.results) >= 10)
        killed_at = time.monotonic()
        ray_cluster.kill(ray_cluster.get_actor(victim, namespace="serve"), no_restart=True)
        wait_for(lambda: (names := replicas("ImageEncoder")) and victim not in names)
        wait_for(lambda: len([r for r in stream.since(killed_at) if r[1] == 200]) >= 20)
    failures = [r for r in stream.results if r[1] != 200]
    assert not failures, failures[:5]
    assert health(app)[0] == 200


def test_predictions_are_logged_with_timings_and_training_identical_embeddings_and_counted_in_metrics(
    v1, app, s3, stack, production_model, started_at, ray_cluster
):
    # A catalogue product, raw as a user sends it; the lake holds its training-time embeddings.
    products = lake.current_products(s3, stack, PRODUCT_COLUMNS)
    catalogue = production_model["catalogue"]
    row = products[products["has_image"].fillna(False)].iloc[0]
    raw = catalogue[catalogue["productid"] == row["productid"]].iloc[0]
    image = get_bytes(s3, stack.bucket_lake, row["image_key"])
    designation, description = (
        raw["designation"],
        raw["description"] if isinstance(raw["description"], str) else "",
    )
    with client(app) as http:
        served = http.post(
            "/predict",
            data={"designation": designation, "description": description},
            files={"image": ("p.jpg", image, "image/jpeg")},
        ).json()
        text_only = http.post("/predict", json={"designation": designation, "description": description})
        assert text_only.status_code == 200
    digest = predlog.input_hash(clean_text(designation), clean_text(description), image)
    text_digest = predlog.input_hash(clean_text(designation), clean_text(description), None)

    def logged():
        frame = predlog.read_predictions(s3, app, since=started_at)
        hashes = set(frame["input_hash"])
        return [frame] if {digest, text_digest} <= hashes else None

    (frame,) = wait_for(logged, timeout_s=30, every_s=1)
    assert list(frame.columns) == predlog.COLUMNS
    assert frame["timestamp"].min() >= started_at and frame["model_version"].notna().all()
    mine = frame[frame["input_hash"] == digest].iloc[-1]
    assert mine["has_text"] and mine["has_image"] and mine["prdtypecode"] == served["prdtypecode"]
    assert mine["confidence"] == pytest.approx(served["confidence"], abs=1e-5)
    assert list(mine["top5_codes"]) == [t["prdtypecode"] for t in served["top5"]]
    assert not frame[frame["input_hash"] == text_digest].iloc[-1]["has_image"]
    assert 0 < mine["latency_ms"] < 60_000 and mine["batch_size"] >= 1
    for column in ("model_name", "model_version", "input_hash"):  # never the raw text
        assert not frame[column].astype(str).str.contains(clean_text(designation)[:20], regex=False).any()

    # The embeddings the service computed equal the embed job's: same text preparation, same image path.
    set_id = encoder_set_id(*encoder_ids(stack))
    inputs = embedding_inputs(products[products["productid"] == row["productid"]], stack, set_id)
    stored = read_embeddings(s3, stack, set_id, ["embed_hash", "text_emb", "image_emb"])
    stored = stored[stored["embed_hash"] == inputs["embed_hash"].iloc[0]].iloc[0]
    np.testing.assert_allclose(mine["text_emb"], stored["text_emb"], atol=1e-4)
    np.testing.assert_allclose(mine["image_emb"], stored["image_emb"], atol=1e-4)
    assert json.loads(json.dumps(served))  # plain JSON all the way

    # The same requests, counted and timed on Ray's metrics endpoint (Prometheus text).
    port = ray_cluster.nodes()[0]["MetricsExportPort"]

    def exported():
        with httpx.Client(timeout=5) as scrape:
            text = scrape.get(f"http://{app.host}:{port}/metrics").text
        wanted = ("ray_rakuten_requests", 'route="/predict"', 'status="200"',
                  "ray_rakuten_request_latency_ms_bucket", "ray_rakuten_model_batch_size_bucket")  # fmt: skip
        return text if all(w in text for w in wanted) else None

    assert wait_for(exported, timeout_s=60, every_s=2)


def test_fault_s3_killed_under_traffic_every_request_answers_and_every_log_row_lands(v1, app, s3, stack):
    """The S3 server is killed (-9) while requests come in: a prediction never needs S3, and its log row
    waits in the replica's spool until S3 is back (rows counted by their input hashes)."""
    texts = [f"Coussin déhoussable motif {i}" for i in range(12)]
    s3_pid = next(r["pid"] for r in stack_mod.status(stack) if r["name"] == "s3")
    os.killpg(os.getpgid(s3_pid), signal.SIGKILL)
    try:
        with client(app) as http:
            statuses = [http.post("/predict", json={"designation": t}).status_code for t in texts]
        assert statuses == [200] * len(texts)
        wait_for(lambda: health(app)[1]["prediction_log"]["spooled"] >= len(texts))
    finally:
        stack_mod.up(stack, ["s3"], echo=lambda *_: None)
    hashes = {predlog.input_hash(clean_text(t), "", None) for t in texts}

    def landed() -> bool:
        frame = predlog.read_predictions(s3, app, columns=["input_hash"])
        return hashes <= set(frame["input_hash"])

    wait_for(landed, timeout_s=60, every_s=1)
    # A file is deleted from the spool right after its upload: the spool empties, eventually.
    log = wait_for(lambda: (log := health(app)[1]["prediction_log"])["spool_files"] == 0 and log)
    assert log["dropped"] == 0
