"""One seeded training run of the fusion head, in plain PyTorch (``lib.model.tune`` runs it in Ray Tune)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from lib.model.dataset import Dataset
from lib.model.metrics import summary
from lib.model.network import FusionConfig, MultimodalMLP, SparseBatch
from lib.model.split import TRAIN, VAL


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters of one training run."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 128
    max_epochs: int = 30
    patience: int = 5  # epochs without val-loss improvement before stopping
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    lr_factor: float = 0.5  # ReduceLROnPlateau factor
    lr_patience: int = 2
    seed: int = 0


@dataclass
class TrainResult:
    state_dict: dict
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_hparams: dict[str, float] = field(default_factory=dict)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (k · count_c), as scikit-learn's "balanced"; a class absent from y gets weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.divide(len(y), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the run's own learning rate and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_model(
    data: Dataset,
    model_config: FusionConfig,
    train_config: TrainConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on the train split; early stopping on val loss; keep the weights with the best val F1-macro.

    The test split is never read here.
    """
    if model_config.uses_lexical and data.lexical_dim != model_config.lexical_dim:
        raise ValueError(f"the model reads {model_config.lexical_dim} TF-IDF columns, the data has "
                         f"{data.lexical_dim}: run with_lexical first")  # fmt: skip
    torch.manual_seed(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    model = MultimodalMLP(model_config)
    optimizer = make_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=train_config.lr_factor, patience=train_config.lr_patience
    )
    weights = balanced_class_weights(data.part(TRAIN)[2], model_config.n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=train_config.label_smoothing)
    train_split, val_split = _Split.of(data, TRAIN, model), _Split.of(data, VAL, model)
    best = TrainResult(
        copy.deepcopy(model.state_dict()), 0, {"val_f1_macro": -1.0},
        optimizer_hparams={"lr": optimizer.param_groups[0]["lr"],
                           "weight_decay": optimizer.param_groups[0]["weight_decay"]},
    )  # fmt: skip
    best_val_loss, stale = float("inf"), 0
    for epoch in range(1, train_config.max_epochs + 1):
        train_loss = _train_epoch(model, optimizer, loss_fn, train_split, train_config, rng)
        val_loss, val = _validate(model, loss_fn, val_split)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_f1_macro": val["f1_macro"], "val_accuracy": val["accuracy"],
                   "lr": optimizer.param_groups[0]["lr"]}  # fmt: skip
        best.history.append(metrics)
        if val["f1_macro"] > best.best_val["val_f1_macro"]:
            best.state_dict = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_val = epoch, {k: metrics[k] for k in ("val_f1_macro", "val_loss")}
        scheduler.step(val_loss)
        if on_epoch:
            on_epoch(metrics)
        if val_loss < best_val_loss - 1e-4:
            best_val_loss, stale = val_loss, 0
        else:
            stale += 1
            if stale >= train_config.patience:
                break
    return best


@dataclass
class _Split:
    """One split's tensors, and its TF-IDF rows for a head that reads them."""

    text: torch.Tensor
    image: torch.Tensor
    y: torch.Tensor
    lexical: sp.csr_matrix | None
    all_lexical: SparseBatch | None  # every row's, built once (validation reads them every epoch)

    @classmethod
    def of(cls, data: Dataset, name: str, model: MultimodalMLP) -> _Split:
        text, image, y = (torch.from_numpy(a) for a in data.part(name))
        lexical = data.lexical_part(name) if model.reads_lexical else None
        return cls(text, image, y, lexical, None if lexical is None else SparseBatch.from_csr(lexical))

    def lexical_rows(self, rows: np.ndarray | None = None) -> SparseBatch | None:
        if self.lexical is None or rows is None:
            return self.all_lexical
        return SparseBatch.from_csr(self.lexical[rows])


def _train_epoch(
    model: MultimodalMLP,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    split: _Split,
    config: TrainConfig,
    rng: np.random.Generator,
) -> float:
    """One pass over the training split in shuffled mini-batches; returns the mean training loss."""
    model.train()
    order = rng.permutation(len(split.y))
    total = 0.0
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        if len(rows) < 2:  # BatchNorm needs two rows
            continue
        idx = torch.from_numpy(rows)
        optimizer.zero_grad()
        logits = model(split.text[idx], split.image[idx], split.lexical_rows(rows))
        loss = loss_fn(logits, split.y[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += loss.item() * len(rows)
    return total / max(1, len(split.y))


@torch.no_grad()
def _validate(model: MultimodalMLP, loss_fn: nn.Module, split: _Split) -> tuple[float, dict[str, float]]:
    """Validation loss and scores of the model in eval mode."""
    model.eval()
    logits = model(split.text, split.image, split.lexical_rows())
    return loss_fn(logits, split.y).item(), summary(split.y.numpy(), logits.argmax(1).numpy())


def configs_from_trial(
    trial: dict,
    text_dim: int,
    image_dim: int,
    n_classes: int,
    base: TrainConfig,
    modality: str = "fusion",
    lexical_dim: int = 0,
) -> tuple[FusionConfig, TrainConfig]:
    """A Tune trial's sampled values → the model and training configs that use them.

    ``lexical_dim`` is the TF-IDF width of the data (0: none); the trial's ``lexical_proj`` (0: off)
    decides whether the head reads it.
    """
    model_config = FusionConfig(
        text_dim=text_dim, image_dim=image_dim, n_classes=n_classes,
        hidden=(trial["hidden1"], trial["hidden2"], trial["hidden3"]), dropout=trial["dropout"],
        activation=trial["activation"], modality=modality, lexical_dim=lexical_dim,
        lexical_proj=int(trial.get("lexical_proj", 0)) if lexical_dim else 0,
        lexical_wide=bool(trial.get("lexical_wide", False)) and lexical_dim > 0,
    )  # fmt: skip
    train_config = TrainConfig(
        **{**asdict(base), "lr": trial["lr"], "weight_decay": trial["weight_decay"],
           "batch_size": int(trial["batch_size"])}
    )  # fmt: skip
    return model_config, train_config
