"""Acceptance on real data: the real Rakuten sample, zipped in the official layout, dropped into
``incoming/``; the watcher (a Ray job) runs the whole pipeline; then 200 real requests to Serve.

Prints products accepted/rejected, embedding items/s, tuning wall time, test F1-macro and weighted F1
(fusion, text-only, image-only) and Serve p50/p99. Needs ``RAKUTEN_REAL_DATA`` (or ../shared/data).
"""

from __future__ import annotations

import base64
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import mlflow
import pandas as pd

from benchmarks.common import bench_parser, bench_stack, print_table, real_data_dir, zip_real_sample
from jobs import submit as submitter
from jobs import watch as watch_job
from jobs.demo import file_batch_id, wait_for_pipeline, wait_for_serve
from lib.data.rakuten import X_FILE, image_member_name
from lib.data.storage import s3_client
from lib.ops.stack import reset_lake_and_registry
from serve import deploy as serve_deploy

REQUESTS = 200


def real_requests(zip_path: Path, n: int) -> list[dict]:
    """The first ``n`` products of the ZIP as /predict JSON bodies (with their image when there is one)."""
    with zipfile.ZipFile(zip_path) as zf:
        x = pd.read_csv(zf.open(X_FILE), index_col=0, keep_default_na=False)
        names = set(zf.namelist())
        bodies = []
        for row in x.head(n).itertuples():
            body = {"designation": row.designation, "description": row.description}
            member = image_member_name(int(row.imageid), int(row.productid))
            if member in names:
                body["image_base64"] = base64.b64encode(zf.read(member)).decode()
            bodies.append(body)
    return bodies


def main(argv: list[str] | None = None) -> None:
    bench_parser("bench_acceptance", __doc__).parse_args(argv)  # no options: --help only
    real = real_data_dir()
    if real is None:
        print("no real sample: set RAKUTEN_REAL_DATA to the folder of X_train_update.csv; nothing measured")
        return
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        # The bench stack's state outlives a run: a lake that already holds this sample would make the
        # pipeline a no-op (duplicate batch, cached embeddings) and measure nothing.
        reset_lake_and_registry(settings)
        zip_path = zip_real_sample(real, Path(tmp) / "rakuten_real.zip")
        serve_deploy.deploy(settings)
        watcher = watch_job.ensure_running(settings)
        t0 = time.perf_counter()
        settings_client = submitter.job_client(settings)
        s3_client(settings).upload_file(str(zip_path), settings.bucket_incoming, zip_path.name)
        record = wait_for_pipeline(settings, file_batch_id(zip_path), settings.pipeline_timeout_s)
        pipeline_s = time.perf_counter() - t0
        wait_for_serve(settings, settings.serve_ready_timeout_s)
        bodies = real_requests(zip_path, REQUESTS)
        latencies = []
        with httpx.Client(timeout=30) as http:
            http.post(f"{settings.serve_url}/predict", json=bodies[0])  # warm-up
            for body in bodies:
                start = time.perf_counter()
                http.post(f"{settings.serve_url}/predict", json=body).raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)
        settings_client.stop_job(watcher)
        stages = record["stages"]
        mlflow.set_tracking_uri(settings.mlflow_uri)
        ablation = mlflow.artifacts.load_dict(f"runs:/{stages['train']['result']['run_id']}/ablation.json")
    ingest, embed, train = (stages[s]["result"] for s in ("ingest", "embed", "train"))
    p99 = sorted(latencies)[int(0.99 * len(latencies)) - 1]
    print_table(
        "Acceptance on the real Rakuten sample (watcher → pipeline → Serve)",
        ["measure", "value"],
        [
            [
                "rows read / accepted / rejected",
                f"{ingest['rows_read']} / {ingest['accepted']} / {ingest['rejected']}",
            ],
            ["embedding items/s (text + image per product)", embed["items_per_s"]],
            ["tuning wall time, s", train["tune_seconds"]],
            ["pipeline wall time (upload → promoted), s", round(pipeline_s, 1)],
            *[
                [f"test F1-macro / weighted F1 ({m})", f"{v['f1_macro']:.4f} / {v['f1_weighted']:.4f}"]
                for m, v in ablation.items()
            ],
            [
                f"Serve p50 / p99 ms ({REQUESTS} real requests, sequential)",
                f"{statistics.median(latencies):.1f} / {p99:.1f}",
            ],
            ["promoted", f"v{train['version']}: {train['reason']}"],
        ],
    )


if __name__ == "__main__":
    main()
