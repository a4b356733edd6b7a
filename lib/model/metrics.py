"""Classification metrics and their plots."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

# Rows of a training run's ablation (heads with inputs taken away), in display order: text and image
# embeddings alone, the TF-IDF block alone, dense fusion (both embeddings), dense fusion + TF-IDF.
ABLATION_ROWS = ("text", "image", "lexical", "fusion", "fusion_lexical")


def summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """F1-macro, weighted F1 and accuracy."""
    return {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def per_class(y_true: np.ndarray, y_pred: np.ndarray, codes: list[int], names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (label indices 0..n-1 map to ``codes``)."""
    labels = np.arange(len(codes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return pd.DataFrame(
        {"prdtypecode": codes, "name": names, "precision": precision, "recall": recall, "f1": f1,
         "support": support}
    )  # fmt: skip


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, codes: list[int]) -> bytes:
    """Row-normalised confusion matrix as a PNG."""
    # lazy: matplotlib takes seconds to import and only the confusion-matrix plot needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only after choosing the headless backend

    matrix = confusion_matrix(y_true, y_pred, labels=np.arange(len(codes)), normalize="true")
    fig, ax = plt.subplots(figsize=(9, 8), dpi=100)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(codes)), [str(c) for c in codes], rotation=90, fontsize=7)
    ax.set_yticks(range(len(codes)), [str(c) for c in codes], fontsize=7)
    ax.set_xlabel("predicted prdtypecode")
    ax.set_ylabel("true prdtypecode")
    ax.set_title("Confusion matrix (test split, row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE: mean |accuracy − confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)
