"""MLflow reads: aliased model versions, model cards, training runs and their small artifacts."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pandas as pd

from dash_app.data.services import Services
from lib.model.metrics import ABLATION_ROWS

RUN_COLUMNS = [
    "run_id",
    "start",
    "status",
    "test_f1_macro",
    "test_f1_weighted",
    "promoted",
    "version",
    "retune",
]
PER_CLASS_FILE = "per_class_test.csv"
CONFUSION_FILE = "confusion_matrix.png"
ABLATION_FILE = "ablation.json"
LINEAGE_FILE = "lineage.json"


@dataclass
class ModelInfo:
    """A registered model version as the dashboard shows it."""

    alias: str
    version: str
    created: datetime | None
    run_id: str | None
    test_f1_macro: float | None
    test_f1_weighted: float | None
    batch_ids: list[str]
    git_sha: str | None
    encoder_set_id: str | None


@dataclass
class RunDetails:
    """What the training page shows about one parent run."""

    run_id: str
    start: datetime | None
    params: dict[str, str]
    metrics: dict[str, float]
    per_class: pd.DataFrame | None = None
    confusion_png: bytes | None = None
    ablation: dict | None = None
    lineage: dict | None = None

    @property
    def best_params(self) -> dict[str, str]:
        return {k.removeprefix("best_"): v for k, v in sorted(self.params.items()) if k.startswith("best_")}


def import_mlflow() -> ModuleType:
    """The mlflow module, imported on first use rather than at start-up (see :meth:`DataSource.warm_up`)."""
    import mlflow  # why lazy: the import alone takes ~2 s; the app starts without it and warms it up later

    return mlflow


def from_millis(timestamp_ms: int | None) -> datetime | None:
    """An MLflow timestamp (ms since the epoch) as a UTC datetime."""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC) if timestamp_ms else None


def model_info(alias: str, version, run) -> ModelInfo:
    """A registered ``version`` (and its ``run``, if any) as the dashboard shows it."""
    tags = version.tags or {}
    metrics = run.data.metrics if run else {}
    params = run.data.params if run else {}
    f1 = tags.get("test_f1_macro")
    return ModelInfo(
        alias=alias,
        version=str(version.version),
        created=from_millis(version.creation_timestamp),
        run_id=version.run_id,
        test_f1_macro=float(f1) if f1 else metrics.get("test_f1_macro"),
        test_f1_weighted=metrics.get("test_f1_weighted"),
        batch_ids=json.loads(tags.get("batch_ids", "[]")),
        git_sha=tags.get("git_sha"),
        encoder_set_id=params.get("encoder_set_id"),
    )


def ablation_from_metrics(metrics: dict[str, float]) -> dict | None:
    """The ablation F1 scores logged as metrics (runs older than ``ablation.json``), or None."""
    found = {
        m: {"f1_macro": metrics[f"ablation_{m}_test_f1_macro"]}
        for m in ABLATION_ROWS
        if f"ablation_{m}_test_f1_macro" in metrics
    }
    return found or None


class RunsReader:
    """The model registry and the training runs of the MLflow tracking server."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    def client(self):
        """An MLflow client (after a health probe: its own retries would take minutes on a dead server)."""
        self.services.require("mlflow")
        mlflow = import_mlflow()
        mlflow.set_tracking_uri(self.settings.mlflow_uri)  # artifact downloads resolve through it
        return mlflow.MlflowClient(self.settings.mlflow_uri)

    def model(self, alias: str) -> ModelInfo | None:
        """The version behind ``alias`` with its scores and lineage, or None (cached)."""
        return self.services.cached(
            ("model", alias), "mlflow", "the model registry", lambda: self._model(alias)
        )

    def _model(self, alias: str) -> ModelInfo | None:
        client = self.client()
        # Not lib.model.registry.version_by_alias: importing that module loads torch (seconds, ~400 MB).
        try:
            version = client.get_model_version_by_alias(self.settings.registered_model_name, alias)
        except import_mlflow().exceptions.MlflowException:  # no such model or alias
            return None
        run = client.get_run(version.run_id) if version.run_id else None
        return model_info(alias, version, run)

    def card(self, version: str) -> dict:
        """The model card of one registered version (lib.model.registry.load_version; cached for good)."""
        name = self.settings.registered_model_name

        def read() -> dict:
            # why lazy: lib.model.registry loads torch (~5 s, ~1 GB); only old runs lacking encoder_set_id
            from lib.model.registry import load_version

            return load_version(self.client(), name, version).card

        return self.services.cached(
            ("card", name, version), "mlflow", f"model card v{version}", read, immutable=True
        )

    def runs(self) -> pd.DataFrame:
        """Parent training runs (one row each, oldest first) with their test scores (cached)."""
        return self.services.cached(("runs",), "mlflow", "training runs", self._runs)

    def _runs(self) -> pd.DataFrame:
        client = self.client()
        experiment = client.get_experiment_by_name(self.settings.mlflow_experiment)
        if experiment is None:
            return pd.DataFrame(columns=RUN_COLUMNS)
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.stage = 'train'",
            order_by=["attributes.start_time DESC"],
            max_results=self.settings.dash_max_runs,
        )
        versions = {
            v.run_id: str(v.version)
            for v in client.search_model_versions(f"name='{self.settings.registered_model_name}'")
        }
        rows = [
            {
                "run_id": r.info.run_id,
                "start": from_millis(r.info.start_time),
                "status": r.info.status,
                "test_f1_macro": r.data.metrics.get("test_f1_macro"),
                "test_f1_weighted": r.data.metrics.get("test_f1_weighted"),
                "promoted": r.data.tags.get("promotion"),
                "version": versions.get(r.info.run_id),
                "retune": r.data.params.get("retune"),  # full search or refit (lib.model.stage)
            }
            for r in runs
        ]
        return (
            pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values("start", kind="stable").reset_index(drop=True)
        )

    def run_details(self, run_id: str) -> RunDetails:
        """Params, metrics and the small artifacts of one parent run (cached)."""
        return self.services.cached(
            ("run", run_id), "mlflow", f"run {run_id}", lambda: self._run_details(run_id)
        )

    def _run_details(self, run_id: str) -> RunDetails:
        client = self.client()
        run = client.get_run(run_id)
        details = RunDetails(
            run_id=run_id,
            start=from_millis(run.info.start_time),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
        )
        self._read_artifacts(client, details)
        if details.ablation is None:  # older runs: the metrics alone
            details.ablation = ablation_from_metrics(details.metrics)
        return details

    @staticmethod
    def _read_artifacts(client, details: RunDetails) -> None:
        """Fill ``details`` from the run's small artifacts; an absent one stays None."""
        names = {a.path for a in client.list_artifacts(details.run_id)}
        with tempfile.TemporaryDirectory() as tmp:

            def fetch(name: str) -> Path | None:
                return Path(client.download_artifacts(details.run_id, name, tmp)) if name in names else None

            if path := fetch(PER_CLASS_FILE):
                details.per_class = pd.read_csv(path)
            if path := fetch(CONFUSION_FILE):
                details.confusion_png = path.read_bytes()
            if path := fetch(ABLATION_FILE):
                details.ablation = json.loads(path.read_text())
            if path := fetch(LINEAGE_FILE):
                details.lineage = json.loads(path.read_text())

    def training_class_counts(self) -> dict[int, int]:
        """Class counts the production model was trained on (its run's lineage.json), or {}."""
        production = self.model("production")
        if production is None or not production.run_id:
            return {}
        lineage = self.run_details(production.run_id).lineage or {}
        return {int(k): int(v) for k, v in lineage.get("class_counts", {}).items()}
