"""The whole pipeline for one ZIP: ingest → embed → train (+ guarded promotion), resumable per stage.

``python -m jobs.pipeline batch:<id>`` finishes a batch already ingested (the watcher retries that way).

``ray job submit --runtime-env runtime_env.yaml -- python -m jobs.pipeline s3://incoming/NAME.zip``
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

from jobs import classify, embed, ingest, train
from jobs.common import connect_ray, own_submission_id, run_cli
from lib.data import lake
from lib.data.ingest import IngestError, IngestResult
from lib.data.storage import exists, s3_client, split_uri
from lib.data.zip_reader import zip_sha256
from lib.ops import pipeline as bookkeeping
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def run(
    zip_uri: str,
    settings: Settings | None = None,
    trials: int | None = None,
    max_epochs: int | None = None,
    known: tuple[str, str, int] | None = None,
) -> dict:
    """Run the stages that have not succeeded yet for this ZIP, in order; returns the pipeline record.

    ``known``: (ETag, SHA-256, size) of the ZIP as the watcher hashed it; trusted while the object's ETag
    is unchanged, so the ZIP is hashed once per pipeline.
    """
    settings = settings or get_settings()
    require(settings, "s3", "mlflow")
    connect_ray(settings)
    client = s3_client(settings)
    record, digest = find_record(client, settings, zip_uri, known)
    batch_id = record["batch_id"]
    work = {
        # No ZIP any more: an earlier, interrupted run archived it after committing the batch.
        "ingest": lambda: ingest_summary(ingest.run(zip_uri, settings, digest) if digest else None,
                                         lake.committed_manifest(client, settings, batch_id)),
        "embed": lambda: embed.run(settings).to_dict(),
        "train": lambda: train.run(settings, trials, max_epochs).summary(),
        "classify": lambda: classify.classify_stage(settings, client, batch_id).to_dict(),
    }  # fmt: skip
    # The stages are known once ingest has said whether the batch is labelled (train) or not (classify).
    while pending := bookkeeping.pending_stages(record):
        run_stage(client, settings, record, pending[0], work[pending[0]])
    return record


def find_record(client, settings: Settings, source: str, known) -> tuple[dict, tuple[str, int] | None]:
    """The pipeline record to run, and the ZIP's digest when the ZIP is still there to ingest.

    ``source``: the ZIP's URI, or ``batch:<id>`` for a batch already ingested (what the watcher
    resumes: a ZIP's name can be reused for another ZIP, its content id cannot).
    """
    if source.startswith(bookkeeping.BATCH_SOURCE):
        record = bookkeeping.find_by_batch(client, settings, source.removeprefix(bookkeeping.BATCH_SOURCE))
        if record is None:
            raise IngestError(f"no pipeline ever ran for {source}")
        return record, None
    bucket, key = split_uri(source)
    if exists(client, bucket, key):
        digest = zip_digest(client, bucket, key, known)
        return bookkeeping.load_record(client, settings, digest[0][:16], source), digest
    record = bookkeeping.find_by_source(client, settings, source)
    if record is None:
        raise IngestError(f"{source} does not exist and no pipeline ran from it")
    return record, None


def zip_digest(client, bucket: str, key: str, known: tuple[str, str, int] | None) -> tuple[str, int]:
    """(SHA-256, size) of the ZIP: the known one if its ETag still matches, else hashed now."""
    if known is not None and object_etag(client, bucket, key) == known[0]:
        return known[1], known[2]
    return zip_sha256(client, bucket, key)


def object_etag(client, bucket: str, key: str) -> str:
    """The object's ETag without its quotes (it travels on a command line)."""
    return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def run_stage(client, settings: Settings, record: dict, stage: str, work: Callable[[], dict]) -> None:
    """Run one stage, recording running → succeeded (with its summary) or failed (with the error)."""
    t0 = time.monotonic()
    print(f"== {stage}", flush=True)
    bookkeeping.mark(client, settings, record, stage, bookkeeping.RUNNING, job=own_submission_id())
    try:
        details = work()
    except Exception as err:
        error = {"error": repr(err), "traceback": traceback.format_exc()[-4000:]}
        if hasattr(err, "waiting_for"):  # e.g. no production model yet: the watcher resumes it later
            error["waiting_for"] = err.waiting_for
        bookkeeping.mark(client, settings, record, stage, bookkeeping.FAILED, **error)
        raise
    seconds = round(time.monotonic() - t0, 1)
    bookkeeping.mark(client, settings, record, stage, bookkeeping.SUCCEEDED, seconds=seconds, result=details)
    print(f"   {stage}: {details}", flush=True)


def ingest_summary(result: IngestResult | None, committed: dict | None = None) -> dict:
    """What the pipeline record keeps of an ingest (``committed``: the manifest, when the ZIP is gone)."""
    if result is None:
        if committed is None:
            raise IngestError("the batch's ZIP is gone and the batch was never committed: drop it again")
        return {"note": "already ingested", "batch_id": committed["batch_id"],
                "labelled": committed["labelled"]}  # fmt: skip
    m = result.manifest
    return {"batch_id": m.batch_id, "duplicate": result.duplicate, "labelled": m.labelled,
            "rows_read": m.rows_read, "accepted": m.accepted, "rejected": m.rejected, "new": m.new,
            "updated": m.updated, "unchanged": m.unchanged}  # fmt: skip


def parse_known(text: str) -> tuple[str, str, int]:
    """``ETAG:SHA256:SIZE`` (the watcher's ``--known``)."""
    etag, sha, size = text.rsplit(":", 2)
    return etag, sha, int(size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("zip_uri", help="s3://bucket/NAME.zip, or batch:<id> to finish an ingested batch")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--known", type=parse_known, default=None, help="ETAG:SHA256:SIZE of the ZIP")
    args = parser.parse_args(argv)

    def act() -> int:
        record = run(args.zip_uri, trials=args.trials, max_epochs=args.max_epochs, known=args.known)
        stages = ", ".join(f"{s} {v['status']}" for s, v in record["stages"].items())
        print(f"pipeline for batch {record['batch_id']}: {stages}")
        return 0

    return run_cli("pipeline", act)


if __name__ == "__main__":
    raise SystemExit(main())
