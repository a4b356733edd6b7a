"""The model contract and the MLflow registry: packaging, loading, guarded promotion, rollback, pruning.

A registered version is an MLflow pyfunc model whose artifacts are ``weights.pt`` (the fusion head's
state dict), ``card.json`` (label map, encoder ids, architecture, split, data lineage, git sha) and, for
a head with a lexical branch, the TF-IDF vocabulary and IDF weights (``lib.lexical``).
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

from lib.lexical import IDF_FILE, VOCABULARY_FILE, LexicalFeatures
from lib.model import FusionConfig, MultimodalMLP

PRODUCTION = "production"
PREVIOUS = "previous"
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "card.json"


@dataclass
class LoadedModel:
    """A fusion head ready to predict, with its card (and its TF-IDF block if it reads one)."""

    model: MultimodalMLP
    card: dict
    version: str | None = None
    lexical: LexicalFeatures | None = None

    @property
    def codes(self) -> list[int]:
        return self.card["codes"]

    @torch.no_grad()
    def logits(self, text: np.ndarray, image: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        """(n, n_classes) logits from the embeddings and, for a lexical head, the products' texts."""
        from lib.train import predict_logits

        rows = None
        if self.lexical is not None:
            if texts is None:
                raise ValueError(f"model version {self.version} reads the product text: pass texts")
            rows = self.lexical.transform(texts)
        return predict_logits(self.model, text, image, rows)


def write_model_dir(path: Path, state_dict: dict, card: dict, lexical: LexicalFeatures | None = None) -> Path:
    """The files of the model contract (a head with a lexical branch needs its fitted TF-IDF block)."""
    reads_text = FusionConfig.from_dict(card["model_config"]).uses_lexical
    if reads_text and lexical is None:
        raise ValueError("this head has a lexical branch: pass the LexicalFeatures it was trained with")
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path / WEIGHTS_FILE)
    (path / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    if reads_text:  # a head without the branch carries no vocabulary, and its pyfunc takes no text
        lexical.save(path)
    return path


def read_model_dir(path: Path, version: str | None = None) -> LoadedModel:
    """Load a fusion head from a directory holding the contract's files (searched recursively)."""
    card_path = next(Path(path).rglob(CARD_FILE))
    card = json.loads(card_path.read_text())
    config = FusionConfig.from_dict(card["model_config"])
    model = MultimodalMLP(config)
    model.load_state_dict(torch.load(card_path.parent / WEIGHTS_FILE, weights_only=True))
    lexical = LexicalFeatures.load(card_path.parent) if config.uses_lexical else None
    return LoadedModel(model.eval(), card, version, lexical)


def log_model(model_dir: Path, card: dict, pip_requirements: list[str]):
    """Log the model directory as a pyfunc model in the active run (with a tensor signature)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    text_dim, image_dim = card["model_config"]["text_dim"], card["model_config"]["image_dim"]
    inputs = [TensorSpec(np.dtype(np.float32), (-1, text_dim), "text_emb"),
              TensorSpec(np.dtype(np.float32), (-1, image_dim), "image_emb")]  # fmt: skip
    artifacts = {"weights": str(model_dir / WEIGHTS_FILE), "card": str(model_dir / CARD_FILE)}
    if FusionConfig.from_dict(card["model_config"]).uses_lexical:  # it also reads the product text
        inputs.append(TensorSpec(np.dtype(np.str_), (-1,), "text"))
        artifacts |= {"lexical": str(model_dir / VOCABULARY_FILE), "lexical_idf": str(model_dir / IDF_FILE)}
    signature = ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card["codes"])), "probabilities")]),
    )
    from lib.pyfunc import FusionPyfunc  # defining it costs an MLflow warning: only where it is used

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FusionPyfunc(),
        artifacts=artifacts,
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
