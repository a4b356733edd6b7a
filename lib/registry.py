"""The model contract and the MLflow registry: packaging, loading, guarded promotion, rollback, pruning.

A registered version is an MLflow pyfunc model whose artifacts are ``weights.pt`` (the fusion head's
state dict) and ``card.json`` (label map, encoder ids, architecture, split, data lineage, git sha).
Aliases: ``production`` serves; ``previous`` is the rollback target.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lib.model import FusionConfig, MultimodalMLP

PRODUCTION = "production"
PREVIOUS = "previous"
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "card.json"


@dataclass
class LoadedModel:
    """A fusion head ready to predict, with its card."""

    model: MultimodalMLP
    card: dict
    version: str | None = None

    @property
    def codes(self) -> list[int]:
        return self.card["codes"]

    @torch.no_grad()
    def logits(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.model(torch.from_numpy(text), torch.from_numpy(image)).numpy()  # (n, n_classes)


def write_model_dir(path: Path, state_dict: dict, card: dict) -> Path:
    """The two files of the model contract."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path / WEIGHTS_FILE)
    (path / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    return path


def read_model_dir(path: Path, version: str | None = None) -> LoadedModel:
    """Load a fusion head from a directory holding ``weights.pt`` and ``card.json`` (searched recursively)."""
    card_path = next(Path(path).rglob(CARD_FILE))
    card = json.loads(card_path.read_text())
    config = FusionConfig(**{**card["model_config"], "hidden": tuple(card["model_config"]["hidden"])})
    model = MultimodalMLP(config)
    model.load_state_dict(torch.load(card_path.parent / WEIGHTS_FILE, weights_only=True))
    return LoadedModel(model.eval(), card, version)


class FusionPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc face of the fusion head: {text_emb, image_emb} → class probabilities."""

    def load_context(self, context) -> None:
        self.loaded = read_model_dir(Path(context.artifacts["card"]).parent)

    def predict(self, context, model_input, params=None):
        logits = self.loaded.logits(
            np.asarray(model_input["text_emb"], np.float32), np.asarray(model_input["image_emb"], np.float32)
        )
        z = logits / self.loaded.card.get("temperature", 1.0)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def log_model(model_dir: Path, card: dict, pip_requirements: list[str]):
    """Log the model directory as a pyfunc model in the active run (with a tensor signature)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    text_dim, image_dim = card["model_config"]["text_dim"], card["model_config"]["image_dim"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, text_dim), "text_emb"),
                       TensorSpec(np.dtype(np.float32), (-1, image_dim), "image_emb")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card["codes"])), "probabilities")]),
    )  # fmt: skip
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FusionPyfunc(),
        artifacts={"weights": str(model_dir / WEIGHTS_FILE), "card": str(model_dir / CARD_FILE)},
        signature=signature,
        pip_requirements=pip_requirements,
    )


def version_by_alias(client: MlflowClient, name: str, alias: str):
    """The model version behind ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_version(client: MlflowClient, name: str, version: str) -> LoadedModel:
    """Download one registered version and load it."""
    source = client.get_model_version(name, version).source
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
        return read_model_dir(Path(local), version)


def decide_promotion(candidate_f1: float, production_f1: float | None) -> tuple[bool, str]:
    """Promote only a strict improvement of test F1-macro on the same split."""
    if production_f1 is None:
        return True, "no production model yet"
    if candidate_f1 > production_f1:
        return True, f"candidate F1-macro {candidate_f1:.4f} > production {production_f1:.4f}"
    return False, f"candidate F1-macro {candidate_f1:.4f} <= production {production_f1:.4f}"


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
        raise RuntimeError(f"rollback needs both @{PRODUCTION} and @{PREVIOUS} on model {name!r}")
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
