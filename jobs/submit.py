"""Submit a job to the Ray cluster with the project's runtime environment and the code's git sha.

``python -m jobs.submit [--id ID] [--no-wait] -- python -m jobs.pipeline s3://incoming/NAME.zip``

Jobs run from a copy of the working directory without ``.git``; the sha is captured here, at submit
time, and passed as ``RAKUTEN_GIT_SHA`` so models record the code that trained them.
"""

from __future__ import annotations

import argparse
import time

import yaml
from ray.job_submission import JobSubmissionClient

from lib.ops.preflight import use_stack_ray
from lib.ops.provenance import git_sha
from lib.settings import PROJECT_ROOT, Settings, get_settings

FINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def runtime_env(settings: Settings) -> dict:
    """``runtime_env.yaml`` with an absolute working_dir and the git sha added."""
    env = yaml.safe_load((PROJECT_ROOT / "runtime_env.yaml").read_text())
    env["working_dir"] = str((PROJECT_ROOT / env.get("working_dir", ".")).resolve())
    env.setdefault("env_vars", {})["RAKUTEN_GIT_SHA"] = git_sha(settings)
    return env


def job_client(settings: Settings) -> JobSubmissionClient:
    """The job API of the stack's Ray head (with the stack's token)."""
    use_stack_ray(settings)
    return JobSubmissionClient(settings.ray_dashboard_url)


def submit(entrypoint: str, settings: Settings | None = None, submission_id: str | None = None) -> str:
    """Submit ``entrypoint``; returns the submission id."""
    settings = settings or get_settings()
    return job_client(settings).submit_job(
        entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env(settings)
    )


def status(client, submission_id: str) -> str | None:
    """The job's status name, or None if the cluster has no such job."""
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError:
        return None


def wait(client, submission_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job is final; returns its status. (``ray job submit`` exits 0 for STOPPED jobs.)"""
    deadline = time.monotonic() + timeout_s
    while (state := status(client, submission_id)) not in FINAL_STATES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--id", default=None, help="submission id (unique per cluster)")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command ...")
    args = parser.parse_args(argv)
    command = " ".join(a for a in args.entrypoint if a != "--")
    settings = get_settings()
    submission_id = submit(command, settings, args.id)
    print(f"submitted {submission_id}: {command} (code {git_sha(settings)})")
    if args.no_wait:
        return 0
    client = job_client(settings)
    final = wait(client, submission_id, args.timeout)
    print(client.get_job_logs(submission_id)[-4000:])
    print(f"{submission_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
