"""``python -m dash_app``: serve the dashboard on ``settings.host:settings.dash_port``."""

from __future__ import annotations

import logging
import os
import sys
import threading

from dash_app.app import create_app
from dash_app.data import DataSource
from lib.errors import UserError
from lib.ops.exposure import check_exposure
from lib.settings import get_settings


def main() -> int:
    settings = get_settings()
    try:
        check_exposure(settings, ["dash"])  # beyond loopback, only behind the token
    except UserError as err:
        print(f"dashboard: {err}", file=sys.stderr)
        return 2
    # A dashboard must fail fast: MLflow's client otherwise retries a dead server for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.dash_request_timeout_s)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm bars would flood the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = DataSource(settings)
    threading.Thread(target=data.warm_up, name="dashboard-warm-up", daemon=True).start()
    app = create_app(settings, data)
    print(f"dashboard on {settings.dash_url}", flush=True)
    app.run(host=settings.host, port=settings.dash_port, debug=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
