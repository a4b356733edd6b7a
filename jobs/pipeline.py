"""The whole pipeline for one ZIP: ingest → embed → train (+ guarded promotion), resumable per stage.

``ray job submit --runtime-env runtime_env.yaml -- python -m jobs.pipeline s3://incoming/NAME.zip``
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from jobs import embed, ingest, train
from jobs.common import connect_ray
from lib import pipeline as bookkeeping
from lib.ingest import IngestError, zip_sha256
from lib.settings import Settings, get_settings
from lib.storage import exists, s3_client, split_uri


def run(
    zip_uri: str, settings: Settings | None = None, trials: int | None = None, max_epochs: int | None = None
) -> dict:
    """Run the stages that have not succeeded yet for this ZIP; returns the pipeline record."""
    settings = settings or get_settings()
    connect_ray(settings)
    client = s3_client(settings)
    bucket, key = split_uri(zip_uri)
    if exists(client, bucket, key):
        batch_id = zip_sha256(client, bucket, key)[0][:16]
        record = bookkeeping.load_record(client, settings, batch_id, zip_uri)
    else:
        record = bookkeeping.find_by_source(client, settings, zip_uri)
        if record is None:
            raise IngestError(f"{zip_uri} does not exist and no pipeline ran from it")
    stages = {
        "ingest": lambda: _ingest_summary(
            ingest.run(zip_uri, settings) if exists(client, bucket, key) else None
        ),
        "embed": lambda: embed.run(settings),
        "train": lambda: _train_summary(train.run(settings, trials=trials, max_epochs=max_epochs)),
    }
    for stage in bookkeeping.pending_stages(record):
        t0 = time.monotonic()
        print(f"== {stage}", flush=True)
        bookkeeping.mark(client, settings, record, stage, bookkeeping.RUNNING)
        try:
            details = stages[stage]()
        except Exception as err:
            bookkeeping.mark(
                client,
                settings,
                record,
                stage,
                bookkeeping.FAILED,
                error=repr(err),
                traceback=traceback.format_exc()[-4000:],
            )
            raise
        bookkeeping.mark(
            client,
            settings,
            record,
            stage,
            bookkeeping.SUCCEEDED,
            seconds=round(time.monotonic() - t0, 1),
            result=details,
        )
        print(f"   {stage}: {details}", flush=True)
    return record


def _ingest_summary(manifest: dict | None) -> dict:
    if manifest is None:  # the ZIP was archived by an earlier, interrupted run: the batch is committed
        return {"note": "already ingested"}
    keys = ("batch_id", "duplicate", "rows_read", "accepted", "rejected", "new", "updated", "unchanged")
    return {k: manifest[k] for k in keys if k in manifest}


def _train_summary(out: dict) -> dict:
    if out["skipped"]:
        return {"skipped": True, "reason": out["reason"]}
    return {
        "version": out["version"],
        "run_id": out["run_id"],
        "test": out["test"],
        "ablation": out["ablation"],
        "promoted": out["decision"]["promoted"],
        "reason": out["decision"]["reason"],
        "tune_seconds": round(out["tune_seconds"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("zip_uri")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        record = run(args.zip_uri, trials=args.trials, max_epochs=args.max_epochs)
    except IngestError as err:
        print(f"pipeline failed: {err}", file=sys.stderr)
        return 2
    print(
        f"pipeline for batch {record['batch_id']}: "
        + ", ".join(f"{s} {v['status']}" for s, v in record["stages"].items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
