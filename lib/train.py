"""Training the fusion head: the dataset, one seeded training run, prediction.

Everything here is plain PyTorch + numpy; Ray Tune and MLflow wrap it in ``jobs/train.py``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from lib.embed import to_matrix
from lib.lexical import LexicalFeatures, LexicalSpec, SparseBatch
from lib.metrics import summary
from lib.model import FusionConfig, MultimodalMLP
from lib.split import TEST, TRAIN, VAL, assign_splits


@dataclass
class Dataset:
    """Embeddings, labels and split of the labelled catalogue (row i of every array is one product)."""

    text: np.ndarray  # (n, text_dim) float32
    image: np.ndarray  # (n, image_dim) float32
    y: np.ndarray  # (n,) int64 label index into ``codes``
    split: np.ndarray  # (n,) "train" | "val" | "test"
    productid: np.ndarray  # (n,) int64
    codes: list[int]  # label index → prdtypecode
    fingerprint: str = ""
    texts: np.ndarray | None = None  # (n,) str: the product text the encoder saw (for the lexical block)
    lexical: sp.csr_matrix | None = None  # (n, lexical_dim) TF-IDF rows, once with_lexical ran
    lexical_features: LexicalFeatures | None = None  # the fitted block (saved with a lexical model)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = self.split == name
        return self.text[mask], self.image[mask], self.y[mask]

    def lexical_part(self, name: str) -> sp.csr_matrix | None:
        return None if self.lexical is None else self.lexical[self.split == name]

    def texts_part(self, name: str) -> list[str] | None:
        return None if self.texts is None else list(self.texts[self.split == name])

    @property
    def lexical_dim(self) -> int:
        return 0 if self.lexical is None else self.lexical.shape[1]

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == name).sum()) for name in (TRAIN, VAL, TEST)}


def build_dataset(
    embeddings: pd.DataFrame,
    text_dim: int,
    image_dim: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Dataset:
    """Labelled rows of ``embeddings`` (productid, prdtypecode, embed_hash, text_emb, image_emb[, text])."""
    labelled = embeddings[embeddings["prdtypecode"].notna()].sort_values("productid").reset_index(drop=True)
    codes = sorted(int(c) for c in labelled["prdtypecode"].unique())
    index = {code: i for i, code in enumerate(codes)}
    productid = labelled["productid"].to_numpy(np.int64)
    fingerprint = hashlib.sha256(
        "\n".join([f"{seed}:{val_fraction}:{test_fraction}", *labelled["embed_hash"]]).encode()
    ).hexdigest()[:16]
    return Dataset(
        text=to_matrix(labelled["text_emb"], text_dim),
        image=to_matrix(labelled["image_emb"], image_dim),
        y=np.array([index[int(c)] for c in labelled["prdtypecode"]], dtype=np.int64),
        split=assign_splits(productid, seed, val_fraction, test_fraction),
        productid=productid,
        codes=codes,
        fingerprint=fingerprint,
        texts=labelled["text"].to_numpy(object) if "text" in labelled else None,
    )


def with_lexical(data: Dataset, spec: LexicalSpec) -> Dataset:
    """Fit the TF-IDF block on the training split's texts; add it and every product's rows to the dataset."""
    if data.texts is None:
        raise ValueError("the dataset has no product texts: build it from rows with a 'text' column")
    features = LexicalFeatures.fit(data.texts_part(TRAIN), spec)
    return replace(data, lexical=features.transform(list(data.texts)), lexical_features=features)


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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train_model(
    data: Dataset,
    model_config: FusionConfig,
    train_config: TrainConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on the train split; early stopping on val loss; keep the weights with the best val F1-macro.

    The test split is never read here.
    """
    torch.manual_seed(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    model = MultimodalMLP(model_config)
    optimizer = make_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=train_config.lr_factor, patience=train_config.lr_patience
    )
    text_tr, image_tr, y_tr = data.part(TRAIN)
    text_va, image_va, y_va = data.part(VAL)
    if model_config.uses_lexical and data.lexical_dim != model_config.lexical_dim:
        raise ValueError(f"the model reads {model_config.lexical_dim} TF-IDF columns, the data has "
                         f"{data.lexical_dim}: run with_lexical first")  # fmt: skip
    lex_tr, lex_va = data.lexical_part(TRAIN), data.lexical_part(VAL)
    val_lexical = _lexical_batch(model, lex_va)
    weights = balanced_class_weights(y_tr, model_config.n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=train_config.label_smoothing)
    tensors = [torch.from_numpy(a) for a in (text_tr, image_tr, y_tr)]
    val_tensors = [torch.from_numpy(a) for a in (text_va, image_va, y_va)]

    best = TrainResult(
        copy.deepcopy(model.state_dict()), 0, {"val_f1_macro": -1.0},
        optimizer_hparams={"lr": optimizer.param_groups[0]["lr"],
                           "weight_decay": optimizer.param_groups[0]["weight_decay"]},
    )  # fmt: skip
    best_val_loss, stale = float("inf"), 0
    for epoch in range(1, train_config.max_epochs + 1):
        model.train()
        order = rng.permutation(len(y_tr))
        total = 0.0
        for start in range(0, len(order), train_config.batch_size):
            idx = torch.from_numpy(order[start : start + train_config.batch_size])
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            optimizer.zero_grad()
            lexical = _lexical_batch(model, None if lex_tr is None else lex_tr[idx.numpy()])
            loss = loss_fn(model(tensors[0][idx], tensors[1][idx], lexical), tensors[2][idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            val_logits = model(val_tensors[0], val_tensors[1], val_lexical)
            val_loss = loss_fn(val_logits, val_tensors[2]).item()
        val = summary(y_va, val_logits.argmax(1).numpy())
        metrics = {
            "epoch": epoch,
            "train_loss": total / max(1, len(y_tr)),
            "val_loss": val_loss,
            "val_f1_macro": val["f1_macro"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
        }
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


def load_trained(model_config: FusionConfig, state_dict: dict) -> MultimodalMLP:
    model = MultimodalMLP(model_config)
    model.load_state_dict(state_dict)
    return model.eval()


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


def fit_temperature(logits: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None) -> float:
    """Temperature scaling: the T minimising the NLL of softmax(logits / T) on held-out (validation) rows.

    A 1-D search is exact enough and cannot diverge (unlike a gradient fit on a few hundred rows).
    """
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)) if grid is None else grid
    rows = np.arange(len(y))

    def nll(t: float) -> float:
        return float(-np.log(np.clip(softmax(logits, t)[rows, y], 1e-12, None)).mean())

    return float(min(grid, key=nll))
