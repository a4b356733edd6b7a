"""The fusion head: an MLP over the concatenated [text ‖ image] embeddings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
MODALITIES = ("fusion", "text", "image")


@dataclass
class FusionConfig:
    """Architecture of the fusion head (saved with every registered model)."""

    text_dim: int
    image_dim: int
    n_classes: int
    hidden: tuple[int, int, int] = (512, 256, 128)
    dropout: float = 0.3
    activation: str = "gelu"
    modality: str = "fusion"  # fusion | text | image (single-modality heads for the ablation)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, not {self.activation!r}")
        self.hidden = tuple(int(h) for h in self.hidden)

    @property
    def input_dim(self) -> int:
        return {"fusion": self.text_dim + self.image_dim, "text": self.text_dim, "image": self.image_dim}[
            self.modality
        ]

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


class MultimodalMLP(nn.Module):
    """Input BatchNorm, 3 × (Linear → BatchNorm → activation → Dropout), then the class layer."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
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

    def select(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The input this head reads: (n, text_dim) and (n, image_dim) → (n, input_dim)."""
        if self.config.modality == "text":
            return text
        if self.config.modality == "image":
            return image
        return torch.cat([text, image], dim=1)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.select(text, image)))  # (n, n_classes) logits
