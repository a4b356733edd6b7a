"""Drift signals: recent predictions against the production model's training reference.

Each signal is a number, a threshold and a verdict, so the report reads the same in JSON, HTML and
the dashboard. Thresholds come from Settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass
class Signal:
    name: str
    value: float | None
    threshold: float
    drifted: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def class_distribution(codes: np.ndarray, classes: list[int]) -> np.ndarray:
    """Share of each class in ``codes`` (order of ``classes``)."""
    counts = np.array([(codes == c).sum() for c in classes], dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two distributions over the same bins."""
    e = np.clip(expected, eps, None)
    a = np.clip(actual, eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def class_mix_signals(
    reference: dict[int, int], predicted: np.ndarray, psi_threshold: float, alpha: float
) -> list[Signal]:
    """PSI and a chi-square goodness-of-fit test of the predicted class mix against the training mix."""
    classes = sorted(reference)
    expected = np.array([reference[c] for c in classes], dtype=np.float64)
    expected /= expected.sum()
    observed_share = class_distribution(predicted, classes)
    value = psi(expected, observed_share)
    observed = observed_share * len(predicted)
    chi2 = stats.chisquare(observed + 1e-9, expected * len(predicted) + 1e-9)
    top = sorted(zip(classes, observed_share - expected, strict=True), key=lambda t: -abs(t[1]))[:3]
    detail = ", ".join(f"{c}: {d:+.1%}" for c, d in top)
    return [
        Signal("class_mix_psi", value, psi_threshold, value > psi_threshold, f"largest shifts {detail}"),
        Signal(
            "class_mix_chi2_pvalue",
            float(chi2.pvalue),
            alpha,
            bool(chi2.pvalue < alpha),
            f"chi2={chi2.statistic:.1f}, dof={len(classes) - 1}",
        ),
    ]


def domain_classifier_auc(reference: np.ndarray, recent: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a classifier telling recent rows from reference rows (0.5: same)."""
    # lazy: scikit-learn only for the domain classifier, not for the other signals
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = np.vstack([reference, recent])
    y = np.r_[np.zeros(len(reference)), np.ones(len(recent))]
    folds = StratifiedKFold(n_splits=min(5, len(recent), len(reference)), shuffle=True, random_state=seed)
    scores = cross_val_predict(
        LogisticRegression(C=0.1, max_iter=500), x, y, cv=folds, method="predict_proba"
    )
    return float(roc_auc_score(y, scores[:, 1]))


def embedding_signal(
    name: str, reference: np.ndarray, recent: np.ndarray, threshold: float, min_rows: int, seed: int = 0
) -> Signal:
    """Domain-classifier drift of one modality's embeddings."""
    if len(recent) < min_rows or len(reference) < min_rows:
        return Signal(
            name, None, threshold, False, f"not enough rows ({len(recent)} recent, {len(reference)} ref)"
        )
    auc = domain_classifier_auc(reference, recent, seed)
    return Signal(
        name, auc, threshold, auc > threshold, f"{len(recent)} recent vs {len(reference)} reference"
    )


def confidence_signals(
    reference_conf: np.ndarray,
    recent_conf: np.ndarray,
    abstain_threshold: float,
    max_drop: float,
    max_abstain_increase: float,
) -> list[Signal]:
    """Mean-confidence drop and abstain-rate increase against the model's own test-split behaviour."""
    drop = float(reference_conf.mean() - recent_conf.mean())
    ref_abstain = float((reference_conf < abstain_threshold).mean())
    recent_abstain = float((recent_conf < abstain_threshold).mean())
    increase = recent_abstain - ref_abstain
    return [
        Signal(
            "confidence_drop",
            drop,
            max_drop,
            drop > max_drop,
            f"mean confidence {recent_conf.mean():.3f} vs {reference_conf.mean():.3f} on the test split",
        ),
        Signal(
            "abstain_rate_increase",
            increase,
            max_abstain_increase,
            increase > max_abstain_increase,
            f"abstain rate {recent_abstain:.1%} vs {ref_abstain:.1%} (threshold {abstain_threshold})",
        ),
    ]


def sample_rows(x: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most ``max_rows`` rows, sampled without replacement (bounded cost)."""
    if len(x) <= max_rows:
        return x
    return x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
