"""The fusion head: an MLP over the concatenated [text ‖ image ‖ lexical] features, and its inference.

Like nanoGPT's ``model.py``, this module owns the head's config, its construction from saved weights and
its prediction; registry, pyfunc, monitor and Serve predict an MLP head through it (the calibration both
heads share is ``lib.model.calibration``, so the default experts head never imports torch). It imports no
data or training code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


@dataclass
class SparseBatch:
    """CSR rows as ``nn.EmbeddingBag`` inputs: a weighted sum of projection rows per product."""

    indices: torch.Tensor  # (nnz,) int64 column ids
    offsets: torch.Tensor  # (n,) int64 start of each row in ``indices``
    weights: torch.Tensor  # (nnz,) float32 TF-IDF values

    @classmethod
    def from_csr(cls, rows: sp.csr_matrix) -> SparseBatch:
        rows = rows.tocsr()
        return cls(
            torch.from_numpy(rows.indices.astype(np.int64)),
            torch.from_numpy(rows.indptr[:-1].astype(np.int64)),
            torch.from_numpy(rows.data.astype(np.float32)),
        )


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# Which inputs a head reads. "fusion" is text + image, plus the lexical branch when it has one;
# single-input heads exist for the ablation.
MODALITIES = ("fusion", "text", "image", "lexical")


@dataclass
class FusionConfig:
    """Architecture of the fusion head (saved with every registered model)."""

    text_dim: int
    image_dim: int
    n_classes: int
    hidden: tuple[int, int, int] = (512, 256, 128)
    dropout: float = 0.3
    activation: str = "gelu"
    modality: str = "fusion"  # one of MODALITIES
    lexical_dim: int = 0  # columns of the TF-IDF block (0: the model has no lexical input)
    lexical_proj: int = 0  # width the TF-IDF block is projected to, into the MLP (0: no projection)
    lexical_wide: bool = False  # also a linear map TF-IDF → class logits, added to the MLP's ("wide & deep")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, not {self.activation!r}")
        if self.modality == "lexical" and not self.uses_lexical:
            raise ValueError("a lexical-only head needs lexical_dim > 0 and a projection or the wide path")
        self.hidden = tuple(int(h) for h in self.hidden)

    @property
    def uses_lexical(self) -> bool:
        """Whether the head reads the TF-IDF block (and so needs the product text at prediction)."""
        return (
            self.modality in ("fusion", "lexical")
            and self.lexical_dim > 0
            and (self.lexical_proj > 0 or self.lexical_wide)
        )

    @property
    def dense_dim(self) -> int:
        return {"fusion": self.text_dim + self.image_dim, "text": self.text_dim, "image": self.image_dim,
                "lexical": 0}[self.modality]  # fmt: skip

    @property
    def input_dim(self) -> int:
        return self.dense_dim + (self.lexical_proj if self.uses_lexical else 0)

    @property
    def uses_mlp(self) -> bool:
        """False only for a lexical-only head that is just the wide (linear) path."""
        return self.input_dim > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, values: dict) -> FusionConfig:
        """The inverse of ``to_dict`` (a model card's ``model_config``)."""
        return cls(**{**values, "hidden": tuple(values["hidden"])})


class MultimodalMLP(nn.Module):
    """[dense inputs ‖ TF-IDF projection] → BN → 3 × (Linear → BN → activation → Dropout) → classes."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        # A sum of TF-IDF-weighted rows = a sparse (lexical_dim → lexical_proj) linear map, without
        # ever densifying the (n, lexical_dim) matrix.
        uses = config.uses_lexical
        proj, wide = uses and config.lexical_proj > 0, uses and config.lexical_wide
        self.lexical = nn.EmbeddingBag(config.lexical_dim, config.lexical_proj, mode="sum") if proj else None
        self.wide = nn.EmbeddingBag(config.lexical_dim, config.n_classes, mode="sum") if wide else None
        if wide:
            nn.init.zeros_(self.wide.weight)  # starts as the MLP alone; learns what the terms add
        self.body, self.head = None, None
        if config.uses_mlp:
            layers: list[nn.Module] = [nn.BatchNorm1d(config.input_dim)]
            width = config.input_dim
            for hidden in config.hidden:
                layers += [
                    nn.Linear(width, hidden),
                    nn.BatchNorm1d(hidden),
                    ACTIVATIONS[config.activation](),
                    nn.Dropout(config.dropout),
                ]
                width = hidden
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, config.n_classes)

    @property
    def reads_lexical(self) -> bool:
        return self.lexical is not None or self.wide is not None

    def select(
        self, text: torch.Tensor, image: torch.Tensor, lexical: SparseBatch | None = None
    ) -> torch.Tensor:
        """The input this head reads: (n, text_dim), (n, image_dim), n sparse rows → (n, input_dim)."""
        dense = {"fusion": [text, image], "text": [text], "image": [image], "lexical": []}
        parts = dense[self.config.modality]
        if self.lexical is not None:
            parts = [*parts, self.lexical(lexical.indices, lexical.offsets, lexical.weights)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(
        self, text: torch.Tensor, image: torch.Tensor, lexical: SparseBatch | None = None
    ) -> torch.Tensor:
        if self.reads_lexical and lexical is None:
            raise ValueError("this model has a lexical branch: give the TF-IDF rows of the product texts")
        logits = self.head(self.body(self.select(text, image, lexical))) if self.body is not None else 0
        if self.wide is not None:
            logits = logits + self.wide(lexical.indices, lexical.offsets, lexical.weights)
        return logits  # (n, n_classes)


def load_trained(config: FusionConfig, state_dict: dict) -> MultimodalMLP:
    """A head with trained weights, in eval mode."""
    model = MultimodalMLP(config)
    model.load_state_dict(state_dict)
    return model.eval()


def _lexical_batch(model: MultimodalMLP, lexical: sp.csr_matrix | None) -> SparseBatch | None:
    return SparseBatch.from_csr(lexical) if model.reads_lexical and lexical is not None else None


@torch.no_grad()
def predict_logits(
    model: MultimodalMLP,
    text: np.ndarray,
    image: np.ndarray,
    lexical: sp.csr_matrix | None = None,
    batch: int = 4096,
) -> np.ndarray:
    """Logits for numpy inputs (and TF-IDF rows if the model reads them), in eval mode: (n, n_classes)."""
    model.eval()
    out = [
        model(
            torch.from_numpy(text[i : i + batch]),
            torch.from_numpy(image[i : i + batch]),
            _lexical_batch(model, None if lexical is None else lexical[i : i + batch]),
        ).numpy()
        for i in range(0, len(text), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)
