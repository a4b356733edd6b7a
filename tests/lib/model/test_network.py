"""The fusion head's architecture and inference: inputs per modality, lexical switch, softmax, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.model.calibration import Calibration, fit_calibration, softmax
from lib.model.metrics import expected_calibration_error
from lib.model.network import FusionConfig, MultimodalMLP
from lib.model.train import TrainConfig, configs_from_trial
from tests.lib.model.test_train import TRIAL


def test_single_modality_heads_read_only_their_input():
    config = FusionConfig(text_dim=8, image_dim=6, n_classes=3, hidden=(4, 4, 4), modality="image")
    model = MultimodalMLP(config).eval()
    image = torch.randn(5, 6)
    out_a = model(torch.randn(5, 8), image)
    out_b = model(torch.randn(5, 8), image)
    assert torch.equal(out_a, out_b) and out_a.shape == (5, 3)


def test_lexical_proj_zero_turns_the_branch_off():
    model_config, _ = configs_from_trial(
        {**TRIAL, "lexical_proj": 0}, 8, 6, 4, TrainConfig(), lexical_dim=100
    )
    assert not model_config.uses_lexical and model_config.input_dim == 14
    assert MultimodalMLP(model_config).lexical is None
    with pytest.raises(ValueError, match="lexical"):
        FusionConfig(text_dim=8, image_dim=6, n_classes=3, modality="lexical")


def test_softmax_uses_the_temperature_and_is_stable():
    logits = np.array([[2.0, 1.0, 0.0]])
    p = softmax(logits)
    assert p.sum() == pytest.approx(1.0) and p[0, 0] > p[0, 1] > p[0, 2]
    assert softmax(logits, 2.0)[0, 0] < p[0, 0]  # a higher temperature flattens
    assert np.isfinite(softmax(np.array([[1000.0, -1000.0]]))).all()


def mis_shaped(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose top class is right with probability sigmoid(0.6 · logit(p) + 0.4), p its softmax
    confidence: no single temperature matches that curve."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, 6))
    p = softmax(logits)
    top, confidence = p.argmax(1), np.clip(p.max(1), 1e-6, 1 - 1e-6)
    right = rng.random(n) < 1 / (1 + np.exp(-(0.6 * np.log(confidence / (1 - confidence)) + 0.4)))
    others = (top + rng.integers(1, 6, n)) % 6
    return logits, np.where(right, top, others)


def test_the_top_label_map_fixes_what_temperature_cannot_and_keeps_the_ranking():
    logits, y = mis_shaped(8000, 0)
    calibration = fit_calibration(logits[:4000], y[:4000])
    held_out, truth = logits[4000:], y[4000:]
    temperature_only = Calibration(calibration.temperature)
    after = expected_calibration_error(calibration.probabilities(held_out), truth)
    assert after < 0.03 < expected_calibration_error(temperature_only.probabilities(held_out), truth)
    p = calibration.probabilities(held_out)
    assert np.allclose(p.sum(1), 1) and (p.argmax(1) == held_out.argmax(1)).all()
    # A card written before the map (a temperature only) predicts as it did.
    old_card = Calibration.from_card({"temperature": 2.0, "calibration": {"test_ece_after": 0.1}})
    assert np.allclose(old_card.probabilities(held_out), softmax(held_out, 2.0))
