"""Drift monitoring: recent predictions against the production model's training reference.

``python -m jobs.monitor [--window 24h]``: writes ``lake/monitoring/<UTC timestamp>/report.{json,html}``
and logs the signals to MLflow (experiment ``<experiment>-monitoring``). The logic: ``lib.ops.monitor``.
"""

from __future__ import annotations

import argparse
import re

from jobs.common import run_cli
from lib.ops.monitor import run_monitor
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def parse_window(text: str) -> float:
    """``24h`` / ``90m`` / ``2d`` / ``6`` (hours) → hours."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"window must look like 24h, 90m or 2d, not {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "h"
    return value * {"m": 1 / 60, "h": 1, "d": 24}[unit]


def run(settings: Settings | None = None, window_hours: float | None = None) -> dict:
    """The monitor stage against the configured stack; returns the report."""
    settings = settings or get_settings()
    require(settings, "s3", "mlflow")
    return run_monitor(settings, window_hours)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=parse_window, default=None, help="e.g. 24h, 90m, 2d")
    args = parser.parse_args(argv)
    return run_cli("monitor", lambda: show(run(window_hours=args.window)))


def show(report: dict) -> int:
    """Print the report's verdict and signals."""
    print(f"drift report: {report['verdict']} ({report.get('predictions', 0)} predictions)")
    for s in report["signals"]:
        value = "-" if s["value"] is None else f"{s['value']:.4g}"
        print(
            f"  {s['name']:24s} {value:>8} (threshold {s['threshold']}) {'DRIFT' if s['drifted'] else 'ok'}"
        )
    if "s3_prefix" in report:
        print(f"report: {report['s3_prefix']}report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
