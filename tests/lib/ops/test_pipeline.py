"""The watcher's plan and the pipeline record (pure)."""

from lib.ops.pipeline import (
    ARCHIVE_DUPLICATE,
    FAILED,
    GIVE_UP,
    RESUME,
    RUNNING,
    SUBMIT,
    SUCCEEDED,
    WAIT,
    needs_resume,
    pending_stages,
    plan,
    to_resume,
)


def test_new_zips_are_submitted_one_at_a_time_in_arrival_order():
    actions = plan([("a.zip", "b1"), ("b.zip", "b2")], {}, max_retries=1)
    assert actions == [(SUBMIT, "a.zip", "pipeline-b1"), (WAIT, "b.zip", "")]


def test_a_running_pipeline_blocks_new_submissions():
    actions = plan([("b.zip", "b2")], {"pipeline-b1": "RUNNING"}, max_retries=1)
    assert actions == [(WAIT, "b.zip", "")]


def test_same_content_under_another_name_is_archived_not_rerun():
    jobs = {"pipeline-b1": "SUCCEEDED"}
    assert plan([("copy.zip", "b1")], jobs, 1) == [(ARCHIVE_DUPLICATE, "copy.zip", "pipeline-b1")]


def test_two_copies_arriving_together_wait_for_the_single_pipeline():
    actions = plan([("a.zip", "b1"), ("a-copy.zip", "b1")], {"pipeline-b1": "RUNNING"}, 1)
    assert actions == [(WAIT, "a.zip", "pipeline-b1"), (WAIT, "a-copy.zip", "pipeline-b1")]


def test_failed_pipeline_is_retried_then_given_up():
    assert plan([("a.zip", "b1")], {"pipeline-b1": "FAILED"}, 1) == [(SUBMIT, "a.zip", "pipeline-b1-retry1")]
    jobs = {"pipeline-b1": "FAILED", "pipeline-b1-retry1": "FAILED"}
    assert plan([("a.zip", "b1")], jobs, 1) == [(GIVE_UP, "a.zip", "pipeline-b1-retry1")]


def test_watcher_restart_does_not_resubmit():
    # A new watcher process sees the cluster's job table: the same content maps to the same job id.
    jobs = {"pipeline-b1": "RUNNING", "watcher-1": "STOPPED"}
    assert plan([("a.zip", "b1")], jobs, 1)[0][0] == WAIT


def test_pending_stages_resume_from_the_failed_stage():
    record = {
        "stages": {
            "ingest": {"status": SUCCEEDED},
            "embed": {"status": SUCCEEDED},
            "train": {"status": "failed"},
        }
    }
    assert pending_stages(record) == ["train"]
    assert pending_stages({"stages": {}}) == ["ingest", "embed", "train"]
    record["stages"]["train"]["status"] = SUCCEEDED
    assert pending_stages(record) == []


def record(**statuses: str) -> dict:
    return {"batch_id": "b1", "stages": {stage: {"status": status} for stage, status in statuses.items()}}


def test_an_ingested_batch_whose_later_stage_failed_is_resumed():
    assert needs_resume(record(ingest=SUCCEEDED, embed=SUCCEEDED, train=FAILED), {})
    actions = plan([("new.zip", "b2")], {"pipeline-b1": "FAILED"}, 1, [("batch:b1", "b1")])
    # The unfinished batch goes first, as the retry of its pipeline; the new ZIP waits for it.
    assert actions == [(RESUME, "batch:b1", "pipeline-b1-retry1"), (WAIT, "new.zip", "")]
    jobs = {"pipeline-b1": "FAILED", "pipeline-b1-retry1": "FAILED"}
    assert plan([], jobs, 1, [("batch:b1", "b1")]) == [(GIVE_UP, "batch:b1", "pipeline-b1-retry1")]


def test_a_stage_left_running_is_resumed_only_once_its_job_has_ended():
    killed = record(ingest=SUCCEEDED, embed=RUNNING)
    assert not needs_resume(killed, {"pipeline-b1": "RUNNING"})
    assert needs_resume(killed, {"pipeline-b1": "FAILED"})
    assert not needs_resume(killed, {})  # a run by hand: its owner's
    assert not needs_resume(record(ingest=FAILED), {"pipeline-b1": "FAILED"})  # its ZIP is still in incoming/
    assert not needs_resume(record(ingest=SUCCEEDED, embed=SUCCEEDED, train=SUCCEEDED), {})


def test_a_stage_whose_job_died_with_the_ray_head_is_resumed():
    killed = record(ingest=SUCCEEDED, embed=RUNNING)
    killed["stages"]["embed"]["job"] = "pipeline-b1"
    assert not needs_resume(killed, {"pipeline-b1": "RUNNING"})
    assert needs_resume(killed, {})  # a restarted head knows no job: the one that ran the stage is gone
    # ...and the watcher resubmits it on the new cluster, whose job history starts empty.
    assert plan([], {}, 1, [("batch:b1", "b1")]) == [(RESUME, "batch:b1", "pipeline-b1")]


def test_a_batch_waiting_for_a_model_is_resumed_only_once_one_exists():
    waiting = record(ingest=SUCCEEDED, embed=SUCCEEDED, classify=FAILED)
    waiting["stages"]["ingest"]["result"] = {"labelled": False}
    waiting["stages"]["classify"]["waiting_for"] = "production model"
    asked = []

    def model_ready(answer: bool):
        return lambda: asked.append(answer) or answer

    assert pending_stages(waiting) == ["classify"]  # an unlabelled batch is classified, never trained
    assert to_resume([waiting, waiting], {"pipeline-b1": "FAILED"}, model_ready(False)) == []
    assert asked == [False]  # the registry is asked once per pass
    assert to_resume([waiting], {"pipeline-b1": "FAILED"}, model_ready(True)) == [("batch:b1", "b1")]
