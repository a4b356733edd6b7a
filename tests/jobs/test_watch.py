"""The watcher's loop: it outlives outages."""

from __future__ import annotations

from jobs.watch import watch
from lib.settings import Settings


def test_the_watch_loop_survives_failed_passes_and_backs_off():
    """An S3 or job-API outage used to end the watcher's loop for good (no try in it)."""
    settings = Settings(watch_interval_s=1.0, watch_max_backoff_s=4.0)
    outcomes = iter([RuntimeError("S3 down"), RuntimeError("S3 down"), RuntimeError("S3 down"), None, None])
    scans, sleeps = [], []

    class Watcher:  # stands in for jobs.watch.Watcher: what a pass does is not under test here
        def __init__(self, _settings) -> None:
            error = next(outcomes)
            if error is not None:
                raise error

        def scan(self) -> None:
            scans.append(1)

        def maybe_monitor(self) -> None:
            pass

    failures = watch(settings, passes=5, make_watcher=Watcher, sleep=sleeps.append)
    assert failures == 3 and len(scans) == 2
    assert sleeps == [2.0, 4.0, 4.0, 1.0]  # doubling back-off, capped, then the normal interval again
