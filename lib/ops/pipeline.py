"""Pipeline bookkeeping: which stages of a ZIP's pipeline have run, so a failed run resumes where it failed.

One JSON record per ZIP content (the batch id), at ``lib.data.layout.pipeline_record_key``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from lib.data.layout import PIPELINE, pipeline_record_key
from lib.data.storage import exists, get_json, list_keys, put_json
from lib.settings import Settings

STAGES = ("ingest", "embed", "train")
SUCCEEDED, FAILED, RUNNING = "succeeded", "failed", "running"


def load_record(client, settings: Settings, batch_id: str, source_uri: str) -> dict:
    """The pipeline record of a batch (a fresh one if it never ran)."""
    if exists(client, settings.bucket_lake, pipeline_record_key(batch_id)):
        return get_json(client, settings.bucket_lake, pipeline_record_key(batch_id))
    return {"batch_id": batch_id, "source_uri": source_uri, "stages": {}}


def find_by_source(client, settings: Settings, source_uri: str) -> dict | None:
    """The record of the pipeline that started from ``source_uri`` (its ZIP may be archived by now)."""
    for key in list_keys(client, settings.bucket_lake, PIPELINE):
        record = get_json(client, settings.bucket_lake, key)
        if record.get("source_uri") == source_uri:
            return record
    return None


def pending_stages(record: dict) -> list[str]:
    """Stages still to run, in order: everything from the first stage that did not succeed."""
    for i, stage in enumerate(STAGES):
        if record["stages"].get(stage, {}).get("status") != SUCCEEDED:
            return list(STAGES[i:])
    return []


def mark(client, settings: Settings, record: dict, stage: str, status: str, **details) -> dict:
    """Record a stage's status (and details) and save the record."""
    record["stages"][stage] = {"status": status, "at": datetime.now(UTC).isoformat(), **details}
    put_json(client, settings.bucket_lake, pipeline_record_key(record["batch_id"]), record)
    return record


# --- the watcher's decisions ----------------------------------------------------------------------
SUBMIT, ARCHIVE_DUPLICATE, GIVE_UP, WAIT = "submit", "archive_duplicate", "give_up", "wait"
ACTIVE_JOB_STATES = {"PENDING", "RUNNING"}


def submission_id(batch_id: str, attempt: int) -> str:
    """Deterministic job id per ZIP content: the cluster refuses a second job with the same id."""
    return f"pipeline-{batch_id}" if attempt == 0 else f"pipeline-{batch_id}-retry{attempt}"


def plan(
    incoming: list[tuple[str, str]], jobs: dict[str, str], max_retries: int
) -> list[tuple[str, str, str]]:
    """What the watcher does now for each ZIP in ``incoming/``.

    ``incoming``: (key, batch_id) oldest first; ``jobs``: submission id → status of the cluster's jobs.
    Returns (action, key, submission id). At most one pipeline is active at a time (one training at a
    time, and ZIPs are processed in arrival order); a ZIP whose content already succeeded is a
    duplicate copy and is archived without running anything.
    """
    busy = any(sid.startswith("pipeline-") and state in ACTIVE_JOB_STATES for sid, state in jobs.items())
    actions = []
    for key, batch_id in incoming:
        attempts = [
            sid
            for sid in jobs
            if sid == submission_id(batch_id, 0) or sid.startswith(f"{submission_id(batch_id, 0)}-retry")
        ]
        last = submission_id(batch_id, len(attempts) - 1) if attempts else None
        state = jobs.get(last) if last else None
        if state in ACTIVE_JOB_STATES:
            actions.append((WAIT, key, last))
        elif state == "SUCCEEDED":
            actions.append((ARCHIVE_DUPLICATE, key, last))
        elif state is not None and len(attempts) > max_retries:
            actions.append((GIVE_UP, key, last))
        elif busy:
            actions.append((WAIT, key, ""))
        else:
            actions.append((SUBMIT, key, submission_id(batch_id, len(attempts))))
            busy = True
    return actions
