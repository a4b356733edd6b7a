"""``make demo``: the whole story on a sample ZIP, against the stack ``make up`` started.

Drops the ZIP into ``s3://incoming/``, lets the watcher run the pipeline (ingest → embed → train →
promote), waits until Serve answers with the promoted model, sends one sample request, prints URLs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pandas as pd

from jobs.common import run_cli
from lib.data.layout import pipeline_record_key
from lib.data.rakuten import X_FILE, image_member_name
from lib.data.storage import exists, get_json, s3_client
from lib.errors import UserError
from lib.ops.pipeline import STAGES, SUCCEEDED
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def file_batch_id(path: Path) -> str:
    """The batch id ingestion will give this ZIP (SHA-256 of its bytes, short form)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def wait_for_pipeline(settings: Settings, batch_id: str, timeout_s: float) -> dict:
    """Follow the pipeline record of the batch until its last stage ends; print stage changes."""
    client, key = s3_client(settings), pipeline_record_key(batch_id)
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        record = (
            get_json(client, settings.bucket_lake, key) if exists(client, settings.bucket_lake, key) else None
        )
        for stage, state in (record or {}).get("stages", {}).items():
            if seen.get(stage) != state["status"]:
                seen[stage] = state["status"]
                print(
                    f"  {stage:7s} {state['status']}"
                    + (f"  {state.get('result', '')}" if state["status"] == SUCCEEDED else ""),
                    flush=True,
                )
                if state["status"] == "failed":
                    raise RuntimeError(f"pipeline stage {stage} failed: {state.get('error')}")
        if record and all(record["stages"].get(s, {}).get("status") == SUCCEEDED for s in STAGES):
            return record
        time.sleep(2)
    raise TimeoutError(f"pipeline of batch {batch_id} not finished after {timeout_s:.0f} s (see `make logs`)")


def sample_request(zip_path: Path) -> dict:
    """The first product of the ZIP as a /predict JSON body."""
    with zipfile.ZipFile(zip_path) as zf:
        x = pd.read_csv(io.BytesIO(zf.read(X_FILE)), index_col=0, keep_default_na=False)
        row = x.iloc[0]
        image = zf.read(image_member_name(int(row["imageid"]), int(row["productid"])))
    return {
        "designation": row["designation"],
        "description": row["description"],
        "image_base64": base64.b64encode(image).decode(),
    }


def summary(answer: dict) -> str:
    keys = ("prdtypecode", "class_name", "confidence", "abstained", "model_version")
    return json.dumps({k: answer.get(k) for k in keys}, ensure_ascii=False)


def wait_for_serve(settings: Settings, timeout_s: float, version: str | None = None) -> dict:
    """Serve's health once it serves a production model (``version``, when the pipeline just promoted one:
    replicas pick it up within ``serve_model_poll_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{settings.serve_url}/health", timeout=5)
            if health.status_code == 200 and version in (None, str(health.json().get("model_version"))):
                return health.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"Serve did not report a production model within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("zip_path", type=Path, help="a Rakuten-format ZIP (e.g. from jobs.make_sample)")
    args = parser.parse_args(argv)
    return run_cli("demo", lambda: demo(args.zip_path, get_settings()))


def demo(zip_path: Path, settings: Settings) -> int:
    """Drop the ZIP, follow its pipeline, query Serve; print what happened."""
    if not zip_path.is_file():
        raise UserError(f"{zip_path} is not a file (make one with `python -m jobs.make_sample`)")
    require(settings, "s3")
    t0 = time.monotonic()
    s3_client(settings).upload_file(str(zip_path), settings.bucket_incoming, zip_path.name)
    batch_id = file_batch_id(zip_path)
    print(
        f"uploaded {zip_path} → s3://{settings.bucket_incoming}/{zip_path.name} "
        f"(batch {batch_id}); the watcher runs the pipeline:",
        flush=True,
    )
    record = wait_for_pipeline(settings, batch_id, settings.pipeline_timeout_s)
    trained = record["stages"]["train"].get("result") or {}
    health = wait_for_serve(
        settings, settings.serve_ready_timeout_s, trained.get("version") if trained.get("promoted") else None
    )
    body = sample_request(zip_path)
    answer = httpx.post(f"{settings.serve_url}/predict", json=body, timeout=30).json()
    text_only = {"designation": body["designation"], "description": body["description"][:200]}
    print(f"\nServe is up with model {health.get('model_name')} v{health.get('model_version')}.")
    print(f"A text + image request (JSON, image_base64) → {summary(answer)}")
    curl = (
        f"curl -s -X POST {settings.serve_url}/predict -H 'content-type: application/json' "
        f"-d '{json.dumps(text_only, ensure_ascii=False).replace(chr(39), ' ')}'"
    )
    answer = httpx.post(f"{settings.serve_url}/predict", json=text_only, timeout=30).json()
    print(f"The same product, text only:\n  {curl}\n  → {summary(answer)}")
    print(
        f"\nDashboard  {settings.dash_url}\nMLflow     {settings.mlflow_uri}"
        f"\nRay        {settings.ray_dashboard_url}\nServe      {settings.serve_url}/predict"
        f"\nS3         {settings.s3_url}"
    )
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
