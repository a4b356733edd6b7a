"""Pipeline bookkeeping: which stages of a ZIP's pipeline have run, so a failed run resumes where it failed.

One JSON record per ZIP content (the batch id), at ``lib.data.layout.pipeline_record_key``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from lib.data.layout import PIPELINE, batch_of_pipeline_record, pipeline_record_key
from lib.data.storage import exists, get_json, list_keys, put_json
from lib.settings import Settings

STAGES = ("ingest", "embed", "train")  # a labelled batch
CLASSIFY_STAGES = ("ingest", "embed", "classify")  # an unlabelled one: classified, never trained on
SUCCEEDED, FAILED, RUNNING = "succeeded", "failed", "running"
BATCH_SOURCE = "batch:"  # ``python -m jobs.pipeline batch:<id>`` finishes a batch already ingested


def load_record(client, settings: Settings, batch_id: str, source_uri: str) -> dict:
    """The pipeline record of a batch (a fresh one if it never ran)."""
    found = find_by_batch(client, settings, batch_id)
    return found or {"batch_id": batch_id, "source_uri": source_uri, "stages": {}}


def find_by_source(client, settings: Settings, source_uri: str) -> dict | None:
    """The newest record of a pipeline that started from ``source_uri`` (its ZIP may be archived by now;
    a name can be reused for another ZIP later)."""
    matches = [r for r in records(client, settings) if r.get("source_uri") == source_uri]
    return matches[-1] if matches else None


def find_by_batch(client, settings: Settings, batch_id: str) -> dict | None:
    """The pipeline record of a batch, if a pipeline ever ran for it."""
    if exists(client, settings.bucket_lake, pipeline_record_key(batch_id)):
        return get_json(client, settings.bucket_lake, pipeline_record_key(batch_id))
    return None


def records(client, settings: Settings, skip: set[str] = frozenset()) -> list[dict]:
    """Every pipeline record but those of the batch ids in ``skip``, oldest first."""
    out = []
    for key in list_keys(client, settings.bucket_lake, PIPELINE):
        if batch_of_pipeline_record(key) not in skip:
            out.append(get_json(client, settings.bucket_lake, key))
    return sorted(out, key=lambda r: min((s["at"] for s in r["stages"].values()), default=""))


def stages_of(record: dict) -> tuple[str, ...]:
    """The batch's stages: known once ingest has said whether it is labelled."""
    ingested = record["stages"].get("ingest", {}).get("result") or {}
    return CLASSIFY_STAGES if ingested.get("labelled") is False else STAGES


def pending_stages(record: dict) -> list[str]:
    """Stages still to run, in order: everything from the first stage that did not succeed."""
    stages = stages_of(record)
    for i, stage in enumerate(stages):
        if record["stages"].get(stage, {}).get("status") != SUCCEEDED:
            return list(stages[i:])
    return []


def waits_for_a_model(record: dict) -> bool:
    """Its classify stage failed for want of a production model (the watcher resumes it once one exists)."""
    return record["stages"].get("classify", {}).get("waiting_for") == "production model"


def mark(client, settings: Settings, record: dict, stage: str, status: str, **details) -> dict:
    """Record a stage's status (and details) and save the record."""
    record["stages"][stage] = {"status": status, "at": datetime.now(UTC).isoformat(), **details}
    put_json(client, settings.bucket_lake, pipeline_record_key(record["batch_id"]), record)
    return record


def needs_resume(record: dict, jobs: dict[str, str]) -> bool:
    """A batch ingested (its ZIP archived, so out of the watcher's sight) whose later stages did not all
    succeed: one failed, or one still says running although the job that ran it has ended (its driver was
    killed) or is unknown to the cluster (the Ray head was restarted: jobs die with it). A stage running
    with no job behind it is a run by hand: left to its owner unless a later pipeline job has ended."""
    stages = record["stages"]
    if stages.get("ingest", {}).get("status") != SUCCEEDED or not pending_stages(record):
        return False
    later = [stages.get(stage, {}) for stage in stages_of(record)]
    if any(stage.get("status") == FAILED for stage in later):
        return True
    running = [stage for stage in later if stage.get("status") == RUNNING]
    if not running:
        return False
    job = running[0].get("job") or last_attempt(record["batch_id"], jobs)
    if job is None:
        return False
    return jobs.get(job) not in ACTIVE_JOB_STATES


def to_resume(
    records: list[dict], jobs: dict[str, str], model_ready: Callable[[], bool]
) -> list[tuple[str, str]]:
    """(``batch:<id>``, batch id) of the records that ``needs_resume``; one waiting for a production model
    only once ``model_ready()`` (asked at most once)."""
    out, ready = [], None
    for record in records:
        if not needs_resume(record, jobs):
            continue
        if waits_for_a_model(record):
            ready = model_ready() if ready is None else ready
            if not ready:
                continue
        out.append((f"{BATCH_SOURCE}{record['batch_id']}", record["batch_id"]))
    return out


# --- the watcher's decisions ----------------------------------------------------------------------
SUBMIT, RESUME, ARCHIVE_DUPLICATE, GIVE_UP, WAIT = "submit", "resume", "archive_duplicate", "give_up", "wait"
ACTIVE_JOB_STATES = {"PENDING", "RUNNING"}


def submission_id(batch_id: str, attempt: int) -> str:
    """Deterministic job id per ZIP content: the cluster refuses a second job with the same id."""
    return f"pipeline-{batch_id}" if attempt == 0 else f"pipeline-{batch_id}-retry{attempt}"


def attempts(batch_id: str, jobs: dict[str, str]) -> int:
    """How many pipeline jobs the cluster has run (or runs) for this batch."""
    first = submission_id(batch_id, 0)
    return sum(1 for sid in jobs if sid == first or sid.startswith(f"{first}-retry"))


def last_attempt(batch_id: str, jobs: dict[str, str]) -> str | None:
    """The submission id of the batch's latest pipeline job, if any."""
    made = attempts(batch_id, jobs)
    return submission_id(batch_id, made - 1) if made else None


def plan(
    incoming: list[tuple[str, str]],
    jobs: dict[str, str],
    max_retries: int,
    unfinished: list[tuple[str, str]] = (),
) -> list[tuple[str, str, str]]:
    """What the watcher does now for each ZIP in ``incoming/`` and each unfinished ingested batch.

    ``incoming``: (key, batch_id) oldest first; ``unfinished``: (source URI, batch_id) of batches that
    ``needs_resume``; ``jobs``: submission id → status of the cluster's jobs. Returns (action, key or
    URI, submission id). At most one pipeline is active at a time (one training at a time), unfinished
    batches first, then ZIPs in arrival order; a ZIP whose content already succeeded is a duplicate copy
    and is archived without running anything. Each batch gets ``max_retries`` resubmissions in all.
    """
    busy = any(sid.startswith("pipeline-") and state in ACTIVE_JOB_STATES for sid, state in jobs.items())
    actions = []
    for resumed, (key, batch_id) in [*((True, item) for item in unfinished),
                                     *((False, item) for item in incoming)]:  # fmt: skip
        made, last = attempts(batch_id, jobs), last_attempt(batch_id, jobs)
        state = jobs.get(last) if last else None
        if state in ACTIVE_JOB_STATES:
            actions.append((WAIT, key, last))
        elif state == "SUCCEEDED" and not resumed:
            actions.append((ARCHIVE_DUPLICATE, key, last))
        elif state is not None and made > max_retries:
            actions.append((GIVE_UP, key, last))
        elif busy:
            actions.append((WAIT, key, ""))
        else:
            actions.append((RESUME if resumed else SUBMIT, key, submission_id(batch_id, made)))
            busy = True
    return actions
