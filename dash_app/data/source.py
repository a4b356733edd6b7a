"""The dashboard's one entry point to its data: a facade over the per-concern readers."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from dash_app.data.lake import Catalogue, LakeReader
from dash_app.data.monitoring import MonitoringReader
from dash_app.data.runs import ModelInfo, RunDetails, RunsReader, import_mlflow
from dash_app.data.services import Services
from dash_app.data.serving import ServingClient
from lib.settings import Settings


class DataSource:
    """Every read of the dashboard: S3 (lake), MLflow (runs, registry), Serve (predictions).

    One per app. The pages call its methods; each delegates to the reader of that concern, and the readers
    share one :class:`~dash_app.data.services.Services` (caches, S3 client, health guard).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = Services(settings)
        self.lake = LakeReader(self.services)
        self.runs_reader = RunsReader(self.services)
        self.serving = ServingClient(self.services, self.lake, self.runs_reader)
        self.monitoring = MonitoringReader(self.services)

    def warm_up(self) -> None:
        """Import MLflow and probe the services ahead of the first page view (the import takes seconds)."""
        import_mlflow()
        self.health()

    # --- services -----------------------------------------------------------------------------------
    def health(self) -> dict[str, bool]:
        return self.services.health()

    # --- lake -----------------------------------------------------------------------------------------
    def catalogue(self) -> Catalogue:
        return self.lake.catalogue()

    def image(self, sha256: str) -> bytes | None:
        return self.lake.image(sha256)

    def classified(self) -> list:
        return self.lake.classified()

    def classified_confidence(self, batch_id: str) -> pd.DataFrame:
        return self.lake.classified_confidence(batch_id)

    def submission(self, batch_id: str) -> bytes:
        return self.lake.submission(batch_id)

    # --- registry and runs ---------------------------------------------------------------------------
    def model(self, alias: str) -> ModelInfo | None:
        return self.runs_reader.model(alias)

    def runs(self) -> pd.DataFrame:
        return self.runs_reader.runs()

    def run_details(self, run_id: str) -> RunDetails:
        return self.runs_reader.run_details(run_id)

    def training_class_counts(self) -> dict[int, int]:
        return self.runs_reader.training_class_counts()

    # --- serving --------------------------------------------------------------------------------------
    def predict(self, designation: str, description: str, image: bytes | None) -> dict:
        return self.serving.predict(designation, description, image)

    def similar(self, designation: str, description: str, image: bytes | None) -> tuple[pd.DataFrame, str]:
        return self.serving.similar(designation, description, image)

    # --- monitoring -----------------------------------------------------------------------------------
    def predictions(self, window: timedelta) -> pd.DataFrame:
        return self.monitoring.predictions(window)

    def drift_report(self) -> dict | None:
        return self.monitoring.drift_report()
