"""Pure evaluation logic: the promotion rule and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from lib.model.evaluate import decide_promotion
from lib.model.metrics import expected_calibration_error
from lib.model.network import fit_temperature, softmax


def test_promotion_needs_a_strict_improvement():
    assert decide_promotion(0.80, None)[0]
    assert decide_promotion(0.81, 0.80)[0]
    assert not decide_promotion(0.80, 0.80)[0]
    assert not decide_promotion(0.70, 0.80)[0]


def test_temperature_scaling_recovers_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])  # labels drawn from calibrated probs
    overconfident = true_logits * 3.0  # what an over-fitted head emits
    t = fit_temperature(overconfident[:2000], y[:2000])
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(overconfident[2000:]), y[2000:])
    after = expected_calibration_error(softmax(overconfident[2000:], t), y[2000:])
    assert after < before / 2
