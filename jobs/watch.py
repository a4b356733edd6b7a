"""The event-driven trigger: a long-running Ray job that turns each new ZIP in ``incoming/`` into one
pipeline job (exactly once per ZIP content), and runs the drift monitor on a schedule.

``python -m jobs.watch`` (the loop) · ``--once`` (one scan) · ``--ensure`` (submit the loop as a Ray job
unless it already runs; used by ``make up``)
"""

from __future__ import annotations

import argparse
import shlex
import time

from mlflow import MlflowClient

from jobs import submit as submitter
from lib.data.ingest import archive_zip
from lib.data.storage import s3_client
from lib.data.zip_reader import zip_sha256
from lib.ops import pipeline
from lib.settings import Settings, get_settings

WATCHER_ENTRYPOINT = "python -m jobs.watch"


class Watcher:
    """State of one watcher process: batch ids of the ZIPs seen (by ETag) and when the monitor last ran."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.s3 = s3_client(settings)
        self.jobs = submitter.job_client(settings)
        self._digests: dict[tuple[str, str], tuple[str, int]] = {}  # (key, ETag) → (SHA-256, size)
        self._known: dict[str, tuple[str, str, int]] = {}  # key → (ETag, SHA-256, size) as listed last
        self._given_up: set[str] = set()
        self._finished: set[str] = set()  # batch ids whose pipeline record has every stage succeeded
        self.last_monitor = time.monotonic()

    def incoming(self) -> list[tuple[str, str]]:
        """(key, batch id) of the ZIPs waiting in incoming/, oldest first."""
        listing = self.s3.list_objects_v2(Bucket=self.settings.bucket_incoming).get("Contents", [])
        out = []
        for obj in sorted(listing, key=lambda o: (o["LastModified"], o["Key"])):
            if not obj["Key"].lower().endswith(".zip"):
                continue
            cache_key = (obj["Key"], obj["ETag"].strip('"'))
            if cache_key not in self._digests:
                self._digests[cache_key] = zip_sha256(self.s3, self.settings.bucket_incoming, obj["Key"])
            self._known[obj["Key"]] = (cache_key[1], *self._digests[cache_key])
            out.append((obj["Key"], self._digests[cache_key][0][:16]))
        return out

    def unfinished(self, jobs: dict[str, str]) -> list[tuple[str, str]]:
        """(``batch:<id>``, batch id) of ingested batches whose later stages need a retry, oldest first."""
        records = pipeline.records(self.s3, self.settings, skip=self._finished)
        self._finished |= {r["batch_id"] for r in records if not pipeline.pending_stages(r)}
        return pipeline.to_resume(records, jobs, self.has_production_model)

    def has_production_model(self) -> bool:
        # lazy: the registry loads torch; the watcher needs it only while a batch waits for a model
        from lib.model import registry

        client = MlflowClient(self.settings.mlflow_uri)
        name = self.settings.registered_model_name
        return registry.version_by_alias(client, name, registry.PRODUCTION) is not None

    def scan(self) -> list[tuple[str, str, str]]:
        """One pass: plan and act; returns the actions taken."""
        jobs = {j.submission_id: str(j.status.value) for j in self.jobs.list_jobs() if j.submission_id}
        actions = pipeline.plan(
            self.incoming(), jobs, self.settings.pipeline_max_retries, self.unfinished(jobs)
        )
        for action, key, submission_id in actions:
            uri = f"s3://{self.settings.bucket_incoming}/{key}"
            if action == pipeline.RESUME:
                # The pipeline runs the batch's stages that did not succeed (its ZIP is archived).
                submitter.submit(f"python -m jobs.pipeline {shlex.quote(key)}", self.settings, submission_id)
                print(f"submitted {submission_id} to finish {key}", flush=True)
            elif action == pipeline.SUBMIT:
                etag, sha, size = self._known[key]  # the pipeline need not hash the ZIP again
                known = shlex.quote(f"{etag}:{sha}:{size}")
                entrypoint = f"python -m jobs.pipeline {shlex.quote(uri)} --known {known}"
                submitter.submit(entrypoint, self.settings, submission_id)
                print(f"submitted {submission_id} for {uri}", flush=True)
            elif action == pipeline.ARCHIVE_DUPLICATE:
                batch_id = submission_id.removeprefix("pipeline-").split("-retry")[0]
                archive_zip(self.s3, self.settings, self.settings.bucket_incoming, key, batch_id)
                print(f"{uri}: same content as batch {batch_id}, already processed: archived", flush=True)
            elif action == pipeline.GIVE_UP and key not in self._given_up:
                self._given_up.add(key)
                tries = self.settings.pipeline_max_retries + 1
                print(f"{key}: pipeline failed {tries} times; see job {submission_id}; given up", flush=True)
        return actions

    def maybe_monitor(self) -> str | None:
        """Submit the drift monitor when its interval has passed."""
        if time.monotonic() - self.last_monitor < self.settings.monitor_interval_s:
            return None
        self.last_monitor = time.monotonic()
        return submitter.submit("python -m jobs.monitor", self.settings)


def ensure_running(settings: Settings) -> str:
    """Submit the watcher loop as a Ray job unless one is already pending or running."""
    client = submitter.job_client(settings)
    for job in client.list_jobs():
        if job.entrypoint == WATCHER_ENTRYPOINT and str(job.status.value) in pipeline.ACTIVE_JOB_STATES:
            return job.submission_id
    return submitter.submit(WATCHER_ENTRYPOINT, settings, f"watcher-{int(time.time())}")


def watch(settings: Settings, passes: int | None = None, make_watcher=Watcher, sleep=time.sleep) -> int:
    """Scan every ``watch_interval_s`` (``passes`` times; None: forever). A pass that fails (S3, the job
    API or MLflow unreachable) is reported and retried with a doubling back-off: the loop never dies of
    an outage. Returns the number of failed passes."""
    watcher, delay, failures, done = None, settings.watch_interval_s, 0, 0
    while passes is None or done < passes:
        try:
            watcher = watcher or make_watcher(settings)
            watcher.scan()
            watcher.maybe_monitor()
            delay = settings.watch_interval_s
        except Exception as err:
            failures, watcher = failures + 1, None
            delay = min(delay * 2, settings.watch_max_backoff_s)
            print(f"watch pass failed ({type(err).__name__}: {err}); retrying in {delay:.0f} s", flush=True)
        done += 1
        if passes is None or done < passes:
            sleep(delay)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.watch", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one scan, then exit")
    mode.add_argument("--ensure", action="store_true", help="start the loop as a Ray job if not running")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.ensure:
        print(f"watcher job: {ensure_running(settings)}")
        return 0
    print(f"watching s3://{settings.bucket_incoming}/ every {settings.watch_interval_s} s", flush=True)
    failures = watch(settings, passes=1 if args.once else None)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
