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
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from lib.features.lexical import IDF_FILE, VOCABULARY_FILE, LexicalFeatures
from lib.model.calibration import Calibration
from lib.model.experts import EXPERTS_FILE, FUSION_FILE, ExpertEnsemble, Inputs

if TYPE_CHECKING:
    from lib.model.network import MultimodalMLP

WEIGHTS_FILE = "weights.pt"
CARD_FILE = "card.json"
EXPERTS_KIND, MLP_KIND = "experts", "mlp"  # the card's head_kind


def reads_text(card: dict) -> bool:
    """Whether the head reads the product text (a TF-IDF block) besides the embeddings."""
    if "reads_text" in card:
        return bool(card["reads_text"])
    from lib.model.network import FusionConfig  # lazy: torch (~0.7 GB resident) only for MLP cards

    return FusionConfig.from_dict(card["model_config"]).uses_lexical  # cards written before experts


def input_dims(card: dict) -> tuple[int, int]:
    """(text_dim, image_dim) of the embeddings the head reads."""
    dims = card.get("input_dims") or card["model_config"]
    return int(dims["text_dim"]), int(dims["image_dim"])


@dataclass
class LoadedModel:
    """A trained head ready to predict (the fusion MLP or the experts), with its card and TF-IDF block."""

    model: MultimodalMLP | None
    card: dict
    version: str | None = None
    lexical: LexicalFeatures | None = None
    ensemble: ExpertEnsemble | None = None

    @property
    def codes(self) -> list[int]:
        return self.card["codes"]

    def lexical_rows(self, texts: list[str]) -> sp.csr_matrix | None:
        """The TF-IDF rows of ``texts`` a head that reads text needs (None for one that does not)."""
        return None if self.lexical is None else self.lexical.transform(texts)

    def logits(
        self,
        text: np.ndarray,
        image: np.ndarray,
        texts: list[str] | None = None,
        lexical: sp.csr_matrix | None = None,
    ) -> np.ndarray:
        """(n, n_classes) logits from the embeddings and, for a lexical head, the products' texts (or
        their ``lexical_rows``, if already computed)."""
        rows = lexical
        if self.lexical is not None and rows is None:
            if texts is None:
                raise ValueError(f"model version {self.version} reads the product text: pass texts")
            rows = self.lexical_rows(texts)
        if self.ensemble is not None:
            return self.ensemble.logits(Inputs(rows, text, image))
        from lib.model.network import predict_logits  # lazy: torch, only an MLP head predicts with it

        return predict_logits(self.model, text, image, rows)

    def probabilities(
        self,
        text: np.ndarray,
        image: np.ndarray,
        texts: list[str] | None = None,
        lexical: sp.csr_matrix | None = None,
    ) -> np.ndarray:
        """(n, n_classes) calibrated probabilities (the card's ``lib.model.calibration.Calibration``)."""
        return Calibration.from_card(self.card).probabilities(self.logits(text, image, texts, lexical))


def write_model_dir(
    path: Path,
    state_dict: dict | None,
    card: dict,
    lexical: LexicalFeatures | None = None,
    ensemble: ExpertEnsemble | None = None,
) -> Path:
    """The files of the model contract: the MLP's weights or the experts', the card, the TF-IDF block."""
    if reads_text(card) and lexical is None:
        raise ValueError("this head reads the product text: pass the LexicalFeatures it was trained with")
    if (state_dict is None) == (ensemble is None):
        raise ValueError("a model directory holds either an MLP's state dict or an expert ensemble")
    path.mkdir(parents=True, exist_ok=True)
    if ensemble is not None:
        ensemble.save(path)
    else:
        import torch  # lazy: ~0.7 GB resident; only an MLP head has a state dict to save

        torch.save(state_dict, path / WEIGHTS_FILE)
    (path / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    if reads_text(card):  # a head without text carries no vocabulary, and its pyfunc takes no text
        lexical.save(path)
    return path


def model_files(card: dict) -> list[str]:
    """The files a model directory with this card holds (what the registry logs)."""
    head = [EXPERTS_FILE, FUSION_FILE] if card.get("head_kind") == EXPERTS_KIND else [WEIGHTS_FILE]
    return [*head, CARD_FILE, *([VOCABULARY_FILE, IDF_FILE] if reads_text(card) else [])]


def read_model_dir(path: Path, version: str | None = None) -> LoadedModel:
    """Load a fusion head from a directory holding the contract's files (searched recursively)."""
    card_path = next(Path(path).rglob(CARD_FILE))
    card = json.loads(card_path.read_text())
    directory = card_path.parent
    lexical = LexicalFeatures.load(directory) if reads_text(card) else None
    if card.get("head_kind") == EXPERTS_KIND:
        return LoadedModel(None, card, version, lexical, ExpertEnsemble.load(directory))
    import torch  # lazy: ~0.7 GB resident; the experts head (the default) never needs it

    from lib.model.network import FusionConfig, MultimodalMLP

    model = MultimodalMLP(FusionConfig.from_dict(card["model_config"]))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, weights_only=True))
    return LoadedModel(model.eval(), card, version, lexical)
