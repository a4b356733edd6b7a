"""Serving throughput and latency: Ray Serve with dynamic batching, the same with batch size 1, and a
plain single-process FastAPI + uvicorn endpoint doing the same work per request (the reference design).

Text-only (JSON) and text+image (multipart, 256 px JPEG) requests at concurrency 1, 8 and 32, on the
benchmark's own stack (Serve's ingress as the stack runs it: HAProxy by default) with a production model
trained by the real pipeline on a generated sample; then a promotion under load. The designs take turns in
``--rounds`` rounds (Serve batched, Serve batch=1, FastAPI, again...; each alone on the machine), so a slow
spell of this VM hits all of them: a cell reports its median over the rounds, a ratio the median of the
rounds' ratios. Targets (issue 24), each printed with ✓/✗: Serve batched ≥ 3× FastAPI (text) and ≥ 2×
(text + image) at concurrency 32; text + image p99 ≤ 150 ms at concurrency 8; no failed request in any cell
nor during the promotion.

Where the time goes: the CPU each process spent per request during Serve's concurrency-32 cells, by
deployment (and HAProxy, the controller, the load generator...). And the limit of any design on this
machine: the encoders alone in a tight loop on one one-thread lane per core (no HTTP, no parsing, no
head) over the same payloads, in requests/s; a ratio target above limit / FastAPI cannot be met here.

``python -m benchmarks.bench_serve [--rounds 3]``
(``--reference PORT`` runs the reference server; used internally)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import psutil
from starlette.requests import Request  # module level: FastAPI resolves the route's string annotations here

from benchmarks.common import bench_parser, bench_stack, mark, print_table
from lib.ops.preflight import use_stack_ray
from lib.settings import PROJECT_ROOT, Settings, get_settings

CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 40, 8: 160, 32: 320}  # measured requests per (design, payload, concurrency)
WARMUP_PER_WORKER = 2
SAMPLE_PRODUCTS = 300
SAMPLE_SEED = 5
PAYLOAD_PRODUCTS = 64
IMAGE_SIZE = 256
TRAIN_TRIALS, TRAIN_EPOCHS = 2, 8
REFERENCE_PORT_OFFSET = 1  # the reference server listens on serve_port + 1
REQUEST_TIMEOUT_S = 120
STARTUP_TIMEOUT_S = 300
DEPLOY_SETTLE_S = 3
TARGETS = {"text": 3.0, "text+image": 2.0}  # Serve batched / FastAPI plain, req/s at concurrency 32
TARGET_IMAGE_P99_MS = 150  # text + image, Serve batched, concurrency 8
PROMOTION_CONCURRENCY, PROMOTION_REQUESTS, PROMOTION_AFTER_S = 8, 600, 1.0
PROFILED_CONCURRENCY = 32
PROFILE_MIN_MS = 0.1  # processes below this CPU per request are summed as "other"
LIMIT_ITEMS = 640  # products each payload kind runs through the encoders for their limit
ROUNDS = 3
SHUTDOWN_TIMEOUT_S = 60


# --- data and model ------------------------------------------------------------------------------


def build_production_model(settings: Settings) -> pd.DataFrame:
    """As tests/conftest.build_production_model: fresh lake and registry, ingest → embed → train.

    Returns the catalogue with an ``image`` column (JPEG bytes) for the request payloads.
    """
    from jobs import embed as embed_job
    from jobs import ingest as ingest_job
    from jobs import train as train_job
    from lib.data.sample import SampleSpec, write_sample_zip
    from lib.data.storage import put_bytes, s3_client
    from lib.ops.stack import reset_lake_and_registry

    reset_lake_and_registry(settings)
    client = s3_client(settings)
    buf = io.BytesIO()
    spec = SampleSpec(products=SAMPLE_PRODUCTS, seed=SAMPLE_SEED, image_size=IMAGE_SIZE)
    catalogue = write_sample_zip(spec, buf)
    put_bytes(client, settings.bucket_incoming, "bench-serve.zip", buf.getvalue())
    ingest_job.run(f"s3://{settings.bucket_incoming}/bench-serve.zip", settings)
    embed_job.run(settings)
    trained = train_job.run(settings, trials=TRAIN_TRIALS, max_epochs=TRAIN_EPOCHS)
    print(f"production model: version {trained.version}, test F1-macro {trained.test['f1_macro']:.3f}")
    with zipfile.ZipFile(buf) as archive:
        images = {name.rsplit("/", 1)[-1]: archive.read(name) for name in archive.namelist()}
    catalogue = catalogue.head(PAYLOAD_PRODUCTS).copy()
    catalogue["image"] = [
        images.get(f"image_{i}_product_{p}.jpg")
        for i, p in zip(catalogue.imageid, catalogue.productid, strict=True)
    ]
    return catalogue


def text_payloads(catalogue: pd.DataFrame) -> list[tuple[bytes, str]]:
    return [
        (json.dumps({"designation": d, "description": s}).encode(), "application/json")
        for d, s in zip(catalogue.designation, catalogue.description.fillna(""), strict=True)
    ]


def multipart_payloads(catalogue: pd.DataFrame) -> list[tuple[bytes, str]]:
    out = []
    for d, s, image in zip(
        catalogue.designation, catalogue.description.fillna(""), catalogue.image, strict=True
    ):
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for name, value in (("designation", d), ("description", s)):
            body.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            )
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
        )
        body.write(image + f"\r\n--{boundary}--\r\n".encode())
        out.append((body.getvalue(), f"multipart/form-data; boundary={boundary}"))
    return out


# --- load generator ------------------------------------------------------------------------------


async def _load(url: str, payloads: list[tuple[bytes, str]], concurrency: int, requests: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            body, ctype = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": ctype}) as resp:
                text = await resp.text()
                if resp.status != 200:
                    errors.append(f"{resp.status} {text[:200]}")
                    continue
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} failed requests, first: {errors[0]}")
    ms = np.array(latencies or [np.nan]) * 1000
    return {
        "rps": len(latencies) / elapsed,  # successful requests only
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": len(errors),
    }


def process_kind(name: str) -> str:
    """What a process is in the serving stack: a Serve replica by its deployment, an actor by its class."""
    if name.startswith("ray::ServeReplica:"):
        return name.rsplit(":", 1)[-1]
    return name.removeprefix("ray::")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of every process, by pid, with its kind (this one: the load generator)."""
    out = {}
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            kind = "load generator" if proc.pid == os.getpid() else process_kind(proc.info["name"] or "?")
            out[proc.pid] = (kind, times.user + times.system)
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request by process kind between two ``cpu_seconds`` snapshots."""
    by_kind: dict[str, float] = defaultdict(float)
    for pid, (kind, seconds) in after.items():
        by_kind[kind] += (seconds - before.get(pid, (kind, 0.0))[1]) * 1000 / requests
    return dict(by_kind)


def measure(url: str, payloads: list[tuple[bytes, str]], concurrency: int, profile: bool = False) -> dict:
    """Warm up, then send ``REQUESTS[concurrency]`` requests with ``concurrency`` in flight; with
    ``profile``, also the CPU per request of every process (``cpu_ms``)."""
    asyncio.run(_load(url, payloads, concurrency, WARMUP_PER_WORKER * concurrency))
    before = cpu_seconds() if profile else {}
    result = asyncio.run(_load(url, payloads, concurrency, REQUESTS[concurrency]))
    if profile:
        result["cpu_ms"] = cpu_per_request(before, cpu_seconds(), REQUESTS[concurrency])
    return result


def run_design(
    name: str, url: str, payload_sets: dict[str, list], cells: dict, profiles: dict | None = None
) -> None:
    """Every payload at every concurrency, appended to ``cells[(name, kind, concurrency)]``; ``profiles``
    collects the CPU profile at PROFILED_CONCURRENCY (a list per payload kind)."""
    for kind, payloads in payload_sets.items():
        for concurrency in CONCURRENCY:
            profile = profiles is not None and concurrency == PROFILED_CONCURRENCY
            r = measure(url, payloads, concurrency, profile)
            if profile:
                profiles.setdefault(kind, []).append(r.pop("cpu_ms"))
            cells.setdefault((name, kind, concurrency), []).append(r)
            print(
                f"  {name:14s} {kind:10s} c={concurrency:<3d} {r['rps']:6.1f} req/s  p99 {r['p99']:6.0f} ms"
            )


def table_rows(cells: dict) -> list[list[object]]:
    """One row per cell: the median over the rounds of req/s, p50 and p99; the errors of every round."""
    rows = []
    for (name, kind, concurrency), results in cells.items():
        median = {key: statistics.median(r[key] for r in results) for key in ("rps", "p50", "p99")}
        errors = sum(r["errors"] for r in results)
        rows.append([name, kind, concurrency, REQUESTS[concurrency], median["rps"], median["p50"],
                     median["p99"], errors])  # fmt: skip
    return rows


def round_ratios(cells: dict, design: str, baseline: str, kind: str, concurrency: int = 32) -> list[float]:
    """``design``'s req/s over ``baseline``'s, round by round (each pair measured minutes apart at most)."""
    mine, theirs = cells[(design, kind, concurrency)], cells[(baseline, kind, concurrency)]
    return [a["rps"] / b["rps"] for a, b in zip(mine, theirs, strict=True)]


# --- the designs -----------------------------------------------------------------------------------


def wait_until_up(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f} s")


@contextmanager
def reference_server(settings: Settings) -> Iterator[str]:
    """The reference design in a subprocess (started and stopped here)."""
    port = settings.serve_port + REFERENCE_PORT_OFFSET
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_serve", "--reference", str(port)], env=os.environ
    )
    try:
        wait_until_up(f"http://{settings.host}:{port}/health", STARTUP_TIMEOUT_S)
        yield f"http://{settings.host}:{port}/predict"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def reference_app(settings: Settings):
    """One process, no batching: FastAPI runs each request's work in its thread pool (same encoders)."""
    import torch
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from mlflow import MlflowClient

    from lib.features.encoders import build_image_encoder, build_text_encoder
    from lib.model import registry
    from lib.model.artifact import input_dims
    from serve import logic

    torch.set_num_threads(1)
    client = MlflowClient(settings.mlflow_uri)
    production = registry.version_by_alias(client, settings.registered_model_name, registry.PRODUCTION)
    loaded = registry.load_version(client, settings.registered_model_name, production.version)
    # One intra-op thread per call, whatever Serve's encoders use: FastAPI's parallelism is its thread pool
    # (several requests at once), and more threads per call would make them fight over the 2 cores.
    same_encoders = settings.model_copy(update={"encoder_threads": 1})
    text_encoder, image_encoder = build_text_encoder(same_encoders), build_image_encoder(same_encoders)
    text_dim, image_dim = input_dims(loaded.card)

    def work(body: bytes, content_type: str | None) -> tuple[int, dict]:
        try:
            item = logic.parse_predict(body, content_type, settings)
        except logic.InputError as exc:
            return exc.status, {"detail": exc.detail}
        text = text_encoder.encode([item.text])[0] if item.has_text else None
        image = None
        if item.has_image:
            encoded = logic.encode_isolating(image_encoder.encode, [item.image])[0]
            if isinstance(encoded, str):
                return 422, {"detail": encoded}
            image = encoded
        t = logic.stack_inputs([text], text_dim)
        i = logic.stack_inputs([image], image_dim)
        probs = loaded.probabilities(t, i, [item.lexical_text(settings.lexical_max_chars)])
        name = settings.registered_model_name
        return 200, logic.prediction(probs[0], loaded.card, settings.abstain_threshold, name, loaded.version)

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model_version": loaded.version}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        status, body = await run_in_threadpool(
            work, await request.body(), request.headers.get("content-type")
        )
        return JSONResponse(body, status_code=status)

    return app


def serve_config(settings: Settings, max_batch_size: int | None = None) -> dict:
    """serve/config.yaml for this stack: the image encoder pinned to one replica (no autoscaling during a
    cell), the ingress replicas as Settings has them;
    ``max_batch_size`` overrides every deployment's user_config."""
    import yaml

    from serve.app import INNER_DEPLOYMENTS, batch_configs

    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": settings.host, "port": settings.serve_port}
    app = config["applications"][0]
    app["name"] = settings.serve_app_name
    pinned = {
        "min_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": settings.serve_target_ongoing_requests,
    }
    overrides: dict[str, dict] = {name: {"name": name} for name in batch_configs(settings)}
    for name in INNER_DEPLOYMENTS:
        overrides[name]["autoscaling_config"] = pinned
    if max_batch_size is not None:
        for name, user_config in batch_configs(settings, max_batch_size).items():
            overrides[name]["user_config"] = user_config
    app["deployments"] = list(overrides.values())
    return config


def serve_deploy(settings: Settings, config: dict) -> str:
    """``serve deploy`` (declarative: a user_config change reconfigures the running replicas in place)."""
    import tempfile

    import yaml
    from ray import serve

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
        subprocess.run(
            [serve_cli, "deploy", f.name, "-a", settings.ray_dashboard_url], check=True, capture_output=True
        )
    time.sleep(DEPLOY_SETTLE_S)  # let the controller pick the new config up before polling its status
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while serve.status().applications[settings.serve_app_name].status != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"application not RUNNING after {STARTUP_TIMEOUT_S} s")
        time.sleep(1)
    wait_until_up(f"{settings.serve_url}/health", STARTUP_TIMEOUT_S)
    return f"{settings.serve_url}/predict"


def promotion_under_load(settings: Settings, url: str, payloads: list[tuple[bytes, str]]) -> dict:
    """Text requests at concurrency 8 while a new version of the production model is promoted: failed
    requests, and whether Serve answered with the new version before the load ended."""
    import threading

    from mlflow import MlflowClient

    from lib.model import registry

    client, name = MlflowClient(settings.mlflow_uri), settings.registered_model_name
    production = registry.version_by_alias(client, name, registry.PRODUCTION).version
    new_version = registry.register_again(client, name, production)
    seen: list[str] = []

    def promote_then_watch() -> None:
        time.sleep(PROMOTION_AFTER_S)
        registry.promote(client, name, new_version)
        deadline = time.monotonic() + settings.serve_model_poll_s * 6
        while time.monotonic() < deadline and not seen:
            health = f"{settings.serve_url}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as resp:
                if json.loads(resp.read()).get("model_version") == new_version:
                    seen.append(new_version)
            time.sleep(0.2)

    watcher = threading.Thread(target=promote_then_watch)
    watcher.start()
    result = asyncio.run(_load(url, payloads, PROMOTION_CONCURRENCY, PROMOTION_REQUESTS))
    watcher.join()
    return result | {"swapped": bool(seen), "version": new_version}


def encoder_limit(settings: Settings, payload_sets: dict[str, list]) -> dict[str, float]:
    """Requests/s of the encoders alone for each payload kind: one one-thread lane per core, batches of
    ``serve_max_batch_size`` of the payloads' parsed inputs; no HTTP, no parsing, no head, no logging."""
    from concurrent.futures import ThreadPoolExecutor

    # lazy: the encoders load only for this measurement (the bench process is the load generator)
    from lib.features.encoders import build_image_encoder, build_text_encoder
    from serve import logic

    one_thread = settings.model_copy(update={"encoder_threads": 1})
    text_encoder, image_encoder = build_text_encoder(one_thread), build_image_encoder(one_thread)
    size = settings.serve_max_batch_size

    def encode(batch: list[logic.PredictInput]) -> None:
        text_encoder.encode([item.text for item in batch if item.has_text])
        image_encoder.encode([item.image for item in batch if item.has_image])

    limits = {}
    with ThreadPoolExecutor(os.cpu_count()) as lanes:
        for kind, payloads in payload_sets.items():
            parsed = [logic.parse_predict(body, content_type, settings) for body, content_type in payloads]
            items = [parsed[i % len(parsed)] for i in range(LIMIT_ITEMS)]
            batches = [items[i : i + size] for i in range(0, LIMIT_ITEMS, size)]
            encode(batches[0])  # warm-up
            t0 = time.perf_counter()
            list(lanes.map(encode, batches))
            limits[kind] = LIMIT_ITEMS / (time.perf_counter() - t0)
    return limits


def mean_profiles(profiles: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each payload kind's CPU ms per request by process kind, averaged over the rounds."""
    out = {}
    for kind, rounds in profiles.items():
        names = {name for cpu in rounds for name in cpu}
        out[kind] = {name: sum(cpu.get(name, 0.0) for cpu in rounds) / len(rounds) for name in names}
    return out


def profile_table(profiles: dict[str, dict[str, float]]) -> list[list[object]]:
    """Rows of CPU ms per request by process kind (columns: payload kinds), the largest first."""
    kinds = list(profiles)
    names = {name for cpu in profiles.values() for name, ms in cpu.items() if ms >= PROFILE_MIN_MS}
    ranked = sorted(names, key=lambda name: -max(cpu.get(name, 0.0) for cpu in profiles.values()))
    rows: list[list[object]] = [[name, *(profiles[k].get(name, 0.0) for k in kinds)] for name in ranked]
    totals = [sum(profiles[k].values()) for k in kinds]
    shown = [sum(profiles[k].get(name, 0.0) for name in ranked) for k in kinds]
    rows.append(["other processes", *(t - s for t, s in zip(totals, shown, strict=True))])
    rows.append(["all", *totals])
    return rows


def target_lines(cells: dict, promotion: dict, limits: dict[str, float]) -> list[str]:
    """Each target of issue 24 with its value and ✓/✗, beside the most this machine allows."""
    by_key = {(r[0], r[1], r[2]): r for r in table_rows(cells)}
    lines = []
    for kind, target in TARGETS.items():
        fastapi = by_key[("fastapi plain", kind, 32)][4]
        ratios = round_ratios(cells, "serve batched", "fastapi plain", kind)
        ratio = statistics.median(ratios)
        each = ", ".join(f"{r:.2f}" for r in ratios)
        lines.append(f"{kind}: Serve batched / FastAPI plain at concurrency 32 = {ratio:.3f}, median of the "
                     f"rounds' {each} (target ≥ {target}) {mark(ratio >= target)}; the encoders alone "
                     f"reach {limits[kind]:.0f} req/s = {limits[kind] / fastapi:.2f}× FastAPI")  # fmt: skip
    p99 = by_key[("serve batched", "text+image", 8)][6]
    lines.append(f"text+image p99 at concurrency 8 = {p99:.0f} ms, median of the rounds "
                 f"(target ≤ {TARGET_IMAGE_P99_MS}) {mark(p99 <= TARGET_IMAGE_P99_MS)}")  # fmt: skip
    errors = sum(r["errors"] for results in cells.values() for r in results)
    lines.append(f"failed requests in every round = {errors} (target 0) {mark(errors == 0)}")
    ok = promotion["errors"] == 0 and promotion["swapped"]
    lines.append(f"promotion to version {promotion['version']} under load "
                 f"(concurrency {PROMOTION_CONCURRENCY}): {promotion['errors']} failed of "
                 f"{PROMOTION_REQUESTS}, new version served: "
                 f"{'yes' if promotion['swapped'] else 'no'} (target 0 failed) {mark(ok)}")  # fmt: skip
    for kind in TARGETS:
        ratio = statistics.median(round_ratios(cells, "serve batched", "serve batch=1", kind))
        lines.append(f"{kind}: batched / batch=1 at concurrency 32 = {ratio:.2f} (the batching's own gain)")
    return lines


def shutdown_serve(settings: Settings) -> None:
    """Serve down and gone (controller, HAProxy, replicas), so the next design has the machine to itself."""
    import ray
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            break
        time.sleep(0.5)
    while time.monotonic() < deadline and _listening(settings.serve_port):
        time.sleep(0.5)


def _listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp"))


def serve_round(
    settings: Settings, payload_sets: dict, cells: dict, profiles: dict, promote: bool
) -> dict | None:
    """Serve batched (profiled), then the same replicas reconfigured to batch size 1; with ``promote``,
    also the promotion under load in between, whose result it returns."""
    promotion = None
    try:
        url = serve_deploy(settings, serve_config(settings))
        run_design("serve batched", url, payload_sets, cells, profiles)
        if promote:
            promotion = promotion_under_load(settings, url, payload_sets["text"])
        # Reconfigured in place: the same replicas with batch size 1.
        url = serve_deploy(settings, serve_config(settings, max_batch_size=1))
        run_design("serve batch=1", url, payload_sets, cells)
    finally:
        shutdown_serve(settings)  # frees its CPUs and memory for the reference run
    return promotion


def main(rounds: int) -> None:
    import ray

    cells: dict = {}
    profiles: dict[str, list] = {}
    with bench_stack() as settings:
        use_stack_ray(settings)
        ray.init(address=settings.ray_address, logging_level="WARNING", log_to_driver=False)
        try:
            catalogue = build_production_model(settings)
            payload_sets = {"text": text_payloads(catalogue), "text+image": multipart_payloads(catalogue)}
            promotion: dict = {}
            for number in range(1, rounds + 1):
                print(f"round {number} of {rounds}")
                promoted = serve_round(settings, payload_sets, cells, profiles, promote=number == 1)
                promotion = promoted or promotion
                with reference_server(settings) as url:
                    run_design("fastapi plain", url, payload_sets, cells)
            limits = encoder_limit(settings, payload_sets)
        finally:
            ray.shutdown()
    ingress = "HAProxy" if settings.serve_haproxy else "Ray's Python proxy"
    print_table(
        f"Serving on {os.cpu_count()} CPUs, medians of {rounds} rounds (ingress: {ingress}; "
        f"{settings.serve_ingress_replicas} ingress replicas; "
        f"max_batch_size {settings.serve_max_batch_size}, "
        f"wait {settings.serve_batch_wait_timeout_s * 1000:.0f} ms, "
        f"lean Serve runtime {'on' if settings.serve_lean_runtime else 'off'})",
        ["design", "payload", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "errors"],
        table_rows(cells),
    )
    print_table(
        f"CPU ms per request, Serve batched at concurrency {PROFILED_CONCURRENCY}, mean of the rounds "
        f"({os.cpu_count()} cores = {os.cpu_count() * 1000} ms of CPU per second)",
        ["process", *profiles],
        profile_table(mean_profiles(profiles)),
    )
    print(f"\nthe encoders alone, {os.cpu_count()} one-thread lanes: "
          + ", ".join(f"{kind} {rps:.0f} req/s" for kind, rps in limits.items()))  # fmt: skip
    print("\n".join(target_lines(cells, promotion, limits)))


def reference_main(port: int) -> None:
    import uvicorn

    settings = get_settings()
    uvicorn.run(reference_app(settings), host=settings.host, port=port, log_level="warning")


if __name__ == "__main__":
    parser = bench_parser("bench_serve", __doc__)
    parser.add_argument("--reference", type=int, metavar="PORT", help="run the reference FastAPI server")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="turns each design takes (default 3)")
    args = parser.parse_args()
    if args.reference:
        reference_main(args.reference)
    else:
        main(args.rounds)
