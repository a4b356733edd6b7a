"""The MLflow model registry: logging a model directory, loading a version, aliases, rollback, pruning.

A registered version is an MLflow pyfunc model whose artifacts are the files of ``lib.model.artifact``.
Aliases: ``production`` serves; ``previous`` is the rollback target.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from lib.errors import UserError
from lib.model.artifact import LoadedModel, input_dims, model_files, read_model_dir, reads_text

PRODUCTION = "production"
PREVIOUS = "previous"


def log_model(model_dir: Path, card: dict, pip_requirements: list[str]):
    """Log the model directory as a pyfunc model in the active run (with a tensor signature)."""
    text_dim, image_dim = input_dims(card)
    inputs = [TensorSpec(np.dtype(np.float32), (-1, text_dim), "text_emb"),
              TensorSpec(np.dtype(np.float32), (-1, image_dim), "image_emb")]  # fmt: skip
    if reads_text(card):  # it also reads the product text (title + newline + description)
        inputs.append(TensorSpec(np.dtype(np.str_), (-1,), "text"))
    artifacts = {Path(name).stem: str(model_dir / name) for name in model_files(card)}
    signature = ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card["codes"])), "probabilities")]),
    )
    # Lazy: defining the pyfunc class costs an MLflow warning in every process that imports it.
    from lib.model.pyfunc import FusionPyfunc

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FusionPyfunc(),
        artifacts=artifacts,
        signature=signature,
        pip_requirements=pip_requirements,
    )


def version_by_alias(client: MlflowClient, name: str, alias: str):
    """The model version behind ``alias``; None only when the model or the alias does not exist.

    Any other error (the server down, a locked database) propagates: it must never read as "no
    production model", which would promote without comparing.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_not_found(err):
            return None
        raise


def is_not_found(err: MlflowException) -> bool:
    """MLflow's answer for a missing registered model or alias (not an outage)."""
    missing_alias = err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
    return err.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias → version of the registered model (a clear error if nothing was ever registered)."""
    try:
        return dict(client.get_registered_model(name).aliases)
    except MlflowException as err:
        if is_not_found(err):
            raise UserError(f"no model named {name!r} is registered yet: run the pipeline first") from err
        raise


def load_version(client: MlflowClient, name: str, version: str) -> LoadedModel:
    """Download one registered version and load it."""
    source = client.get_model_version(name, version).source
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        return read_model_dir(Path(local), version)


def register_again(client: MlflowClient, name: str, version: str) -> str:
    """A new version of the same artifacts as ``version`` (a promotion that changes only the version
    number: what bench_serve promotes under load)."""
    source = client.get_model_version(name, version)
    # MLflow 3 registers a logged model ("models:/<model id>") only with that id named.
    model_id = (
        source.source.removeprefix("models:/").split("/")[0] if source.source.startswith("models:/") else None
    )
    return client.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id).version


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Point ``production`` at ``version``; the replaced version becomes ``previous``. Returns it."""
    current = version_by_alias(client, name, PRODUCTION)
    if current is not None and current.version != str(version):
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, PRODUCTION, str(version))
    return current.version if current is not None else None


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Swap ``production`` and ``previous``; returns (new production, new previous)."""
    current = version_by_alias(client, name, PRODUCTION)
    previous = version_by_alias(client, name, PREVIOUS)
    if current is None or previous is None:
        raise UserError(f"rollback needs both @{PRODUCTION} and @{PREVIOUS} on model {name!r}")
    client.set_registered_model_alias(name, PRODUCTION, previous.version)
    client.set_registered_model_alias(name, PREVIOUS, current.version)
    return previous.version, current.version


def prune_versions(client: MlflowClient, name: str, keep: int) -> list[str]:
    """Delete the oldest versions beyond the newest ``keep``, never an aliased one; returns the deleted."""
    versions = sorted(
        client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True
    )
    aliased = set(client.get_registered_model(name).aliases.values())
    deleted = []
    for version in versions[keep:]:
        if version.version not in aliased:
            client.delete_model_version(name, version.version)
            deleted.append(version.version)
    return deleted
