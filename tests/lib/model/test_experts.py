"""The experts head: fitted without the test split, fused by out-of-fold weights, saved as plain files."""

from __future__ import annotations

import numpy as np

from lib.model.artifact import read_model_dir, write_model_dir
from lib.model.dataset import Dataset, with_lexical
from lib.model.evaluate import expert_ablation, fit_and_test_experts
from lib.model.experts import ExpertConfig, FusionWeights, choose_weights
from lib.model.split import TEST
from tests.lib.model.test_train import LEXICAL_SPEC, toy_dataset


def lexical_toy() -> Dataset:
    data = toy_dataset(n=500)
    image = data.image.copy()
    image[::3] = 0  # a third of the products have no image
    return with_lexical(Dataset(**{**data.__dict__, "image": image}), LEXICAL_SPEC)


def test_test_labels_change_nothing_in_the_fitted_experts_or_their_weights():
    data = lexical_toy()
    head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0)
    shuffled = data.y.copy()
    test = data.split == TEST
    shuffled[test] = np.random.default_rng(1).permutation(shuffled[test])
    other = fit_and_test_experts(Dataset(**{**data.__dict__, "y": shuffled}), ExpertConfig(), folds=3, seed=0)
    assert other.ensemble.weights == head.ensemble.weights
    assert other.report["temperature"] == head.report["temperature"]
    for name, expert in head.ensemble.experts.items():
        assert np.array_equal(expert.coef, other.ensemble.experts[name].coef)
    assert np.array_equal(other.predicted, head.predicted)  # only the scores against the truth move


def test_the_ensemble_learns_and_its_ablation_has_every_row():
    data = lexical_toy()
    head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0)
    assert head.report["f1_macro"] > 0.9  # the reference codes give the class away
    ablation = expert_ablation(data, head)
    assert set(ablation) == {"lexical", "text", "image", "fusion", "fusion_lexical"}
    assert ablation["fusion_lexical"]["f1_macro"] == head.report["f1_macro"]


def test_weights_are_the_best_grid_point_on_the_rows_given():
    y = np.array([0, 1, 2, 0, 1, 2])
    good = np.eye(3)[y] * 5.0  # an expert that is always right
    parts = {"lexical": np.zeros((6, 3)), "text": np.log(np.full((6, 3), 1 / 3)), "image": good}
    weights = choose_weights(parts, y)
    assert weights.image > 0 and (weights.fuse(parts).argmax(1) == y).all()
    assert FusionWeights(10.0, 0.0, 0.0).fuse(parts).shape == (6, 3)


def test_experts_round_trip_through_the_model_files(tmp_path):
    data = lexical_toy()
    head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0)
    card = {"codes": data.codes, "head_kind": "experts", "reads_text": True, "input_dims": {"text_dim": 8,
            "image_dim": 6}, "temperature": head.report["temperature"]}  # fmt: skip
    loaded = read_model_dir(write_model_dir(tmp_path, None, card, data.lexical_features, head.ensemble))
    test = data.split == TEST
    expected = head.ensemble.logits(data.inputs(test))
    # Serving's path: raw texts in, the saved vocabulary and IDF turn them into the same rows.
    got = loaded.logits(data.text[test], data.image[test], list(data.texts[test]))
    assert np.allclose(got, expected, atol=1e-4)
    assert np.allclose(
        loaded.probabilities(data.text[test], data.image[test], list(data.texts[test])).sum(1), 1
    )
