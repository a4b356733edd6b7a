"""Pure evaluation logic: the promotion rule and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.exceptions import MlflowException, RestException

from lib.model.calibration import fit_temperature, softmax
from lib.model.evaluate import decide_promotion
from lib.model.metrics import expected_calibration_error
from lib.model.registry import version_by_alias


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


def test_an_mlflow_outage_is_not_a_missing_production_model():
    """version_by_alias: None for a missing model or alias, but an outage propagates (no blind promotion)."""

    class Registry:  # stands in for MlflowClient: only the error it raises matters here
        def __init__(self, error: MlflowException) -> None:
            self.error = error

        def get_model_version_by_alias(self, name: str, alias: str):
            raise self.error

    # What the MLflow server answers over REST for a missing alias and a missing model.
    missing_alias = RestException(
        {"error_code": "INVALID_PARAMETER_VALUE", "message": "Registered model alias production not found."}
    )
    missing_model = RestException(
        {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model with name=m not found"}
    )
    assert version_by_alias(Registry(missing_alias), "m", "production") is None
    assert version_by_alias(Registry(missing_model), "m", "production") is None
    with pytest.raises(MlflowException, match="locked"):
        version_by_alias(Registry(MlflowException("database is locked")), "m", "production")
