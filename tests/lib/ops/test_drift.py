"""Drift signals on synthetic data: a real shift is flagged, an unshifted sample is not."""

from __future__ import annotations

import numpy as np

from lib.data.rakuten import OFFICIAL_CLASS_COUNTS
from lib.ops.drift import class_mix_signals, confidence_signals, embedding_signal, psi, sample_rows

RNG = np.random.default_rng(0)
CLASSES = sorted(OFFICIAL_CLASS_COUNTS)
SHARES = np.array([OFFICIAL_CLASS_COUNTS[c] for c in CLASSES], float) / sum(OFFICIAL_CLASS_COUNTS.values())


def test_predictions_from_the_training_mix_are_not_flagged():
    predicted = RNG.choice(CLASSES, size=800, p=SHARES)
    signals = class_mix_signals(OFFICIAL_CLASS_COUNTS, predicted, psi_threshold=0.2, alpha=0.01)
    assert [s.drifted for s in signals] == [False, False]
    assert signals[0].value < 0.1


def test_predictions_from_three_classes_are_flagged():
    predicted = RNG.choice([10, 40, 2583], size=300)
    signals = class_mix_signals(OFFICIAL_CLASS_COUNTS, predicted, psi_threshold=0.2, alpha=0.01)
    assert all(s.drifted for s in signals)
    assert "2583" in signals[0].detail or "10" in signals[0].detail


def test_psi_is_zero_for_identical_distributions():
    assert psi(SHARES, SHARES) == 0.0


def embeddings(n: int, centre: np.ndarray, noise: float = 1.0) -> np.ndarray:
    x = centre + RNG.normal(scale=noise, size=(n, centre.size))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_noise_images_are_flagged_and_same_distribution_is_not():
    centre = RNG.normal(size=64)
    reference = embeddings(400, centre)
    same = embedding_signal("image_embedding_auc", reference, embeddings(200, centre), 0.75, 30)
    assert not same.drifted and 0.35 < same.value < 0.65
    noise = RNG.normal(size=(200, 64))  # "images replaced by noise"
    shifted = embedding_signal(
        "image_embedding_auc", reference, noise / np.linalg.norm(noise, axis=1)[:, None], 0.75, 30
    )
    assert shifted.drifted and shifted.value > 0.9


def test_too_few_rows_gives_no_verdict():
    signal = embedding_signal("text_embedding_auc", np.zeros((100, 4)), np.zeros((5, 4)), 0.75, 30)
    assert signal.value is None and not signal.drifted and "not enough" in signal.detail


def test_confidence_drop_and_abstain_increase():
    reference = RNG.uniform(0.6, 1.0, 500)
    steady = confidence_signals(reference, RNG.uniform(0.6, 1.0, 300), 0.5, 0.1, 0.1)
    assert not any(s.drifted for s in steady)
    dropped = confidence_signals(reference, RNG.uniform(0.1, 0.6, 300), 0.5, 0.1, 0.1)
    assert all(s.drifted for s in dropped)


def test_sampling_is_bounded():
    assert len(sample_rows(np.zeros((5000, 3)), 100)) == 100
    assert len(sample_rows(np.zeros((50, 3)), 100)) == 50
