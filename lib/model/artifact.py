"""The model contract on disk: the files of a trained fusion head, and loading them to predict.

A model directory holds ``weights.pt`` (the head's state dict), ``card.json`` (label map, encoder ids,
architecture, split, data lineage, git sha, calibration temperature) and, for a head with a lexical
branch, the TF-IDF vocabulary and IDF weights (``lib.features.lexical``): plain files, no pickle.
Loading imports neither ingestion nor training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.features.lexical import LexicalFeatures
from lib.model.network import FusionConfig, MultimodalMLP, predict_logits, softmax

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
        rows = None
        if self.lexical is not None:
            if texts is None:
                raise ValueError(f"model version {self.version} reads the product text: pass texts")
            rows = self.lexical.transform(texts)
        return predict_logits(self.model, text, image, rows)

    def probabilities(
        self, text: np.ndarray, image: np.ndarray, texts: list[str] | None = None
    ) -> np.ndarray:
        """(n, n_classes) calibrated probabilities: softmax of the logits at the card's temperature."""
        return softmax(self.logits(text, image, texts), self.card.get("temperature", 1.0))


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
