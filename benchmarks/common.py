"""Shared benchmark plumbing: command line, own stack, real-data zipping, resource sampling, tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray

from lib.data.rakuten import X_FILE, Y_FILE
from lib.ops import stack as stack_mod
from lib.settings import PROJECT_ROOT, Settings

# Benchmarks run on their own ports and state so they never disturb `make up` or the tests. Ports stay
# below Linux's ephemeral range (32768+) and clear of the test stack's (S3 29000 has gRPC on 39000).
BENCH_ENV = {
    "RAKUTEN_STATE_DIR": str(PROJECT_ROOT / ".stack" / "bench"),
    "RAKUTEN_S3_PORT": "30000",
    "RAKUTEN_MLFLOW_PORT": "30500",
    "RAKUTEN_RAY_GCS_PORT": "30379",
    "RAKUTEN_RAY_DASHBOARD_PORT": "30265",
    "RAKUTEN_SERVE_PORT": "30800",
    "RAKUTEN_DASH_PORT": "30850",
}


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.<name>``, described by the first line of its docstring.

    Every benchmark parses its arguments, options or not, so ``--help`` never starts a run.
    """
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0])


def real_data_dir() -> Path | None:
    """The real Rakuten sample, if ``RAKUTEN_REAL_DATA`` (or the shared default path) has it."""
    candidates = [os.environ.get("RAKUTEN_REAL_DATA"), str(PROJECT_ROOT.parent / "shared/data/rakuten_real")]
    for candidate in candidates:
        if candidate and (Path(candidate) / X_FILE).exists():
            return Path(candidate)
    return None


def zip_real_sample(source: Path, out: Path) -> Path:
    """Zip a folder laid out like the challenge files (X, Y, images/image_train) into an official ZIP."""
    with zipfile.ZipFile(out, "w") as zf:
        for name in (X_FILE, Y_FILE):
            zf.write(source / name, name, compress_type=zipfile.ZIP_DEFLATED)
        for image in sorted((source / "images" / "image_train").glob("*.jpg")):
            zf.write(image, f"images/image_train/{image.name}", compress_type=zipfile.ZIP_STORED)
    return out


@contextlib.contextmanager
def bench_stack() -> Iterator[Settings]:
    """A stack of the benchmark's own for the duration of the run."""
    os.environ.update(BENCH_ENV)
    from lib.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    stack_mod.up(settings)
    try:
        yield settings
    finally:
        # Leave the cluster before stopping it: a driver whose GCS vanishes exits with status 1.
        ray.shutdown()
        stack_mod.down(settings)


class BackgroundSampler:
    """Calls ``sample()`` every ``interval_s`` on a daemon thread while the ``with`` block runs."""

    interval_s: float = 0.1

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class PeakRss(BackgroundSampler):
    """Samples the peak RSS of this process and of every Ray worker process while active."""

    interval_s: float = 0.1
    driver_mb: float = 0.0
    worker_mb: float = 0.0

    def sample(self) -> None:
        self.driver_mb = max(self.driver_mb, psutil.Process().memory_info().rss / 2**20)
        for proc in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if (proc.info["name"] or "").startswith("ray::") or "ray::" in " ".join(proc.info["cmdline"]):
                    self.worker_mb = max(self.worker_mb, proc.memory_info().rss / 2**20)


def mark(ok: bool) -> str:
    """A target's verdict."""
    return "✓" if ok else "✗"


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain aligned table (benchmarks print numbers, people read them)."""
    cells = [header, *[[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()  # a long benchmark's earlier tables survive its crash
