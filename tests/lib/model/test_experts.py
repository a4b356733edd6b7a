"""The experts head: fitted without the test split, fused by out-of-fold weights, saved as plain files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from lib.model.artifact import read_model_dir, write_model_dir
from lib.model.calibration import Calibration
from lib.model.dataset import Dataset, with_lexical
from lib.model.evaluate import expert_ablation, fit_and_test_experts
from lib.model.experts import ExpertConfig, FusionWeights, LinearExpert, average_experts, choose_weights
from lib.model.metrics import expected_calibration_error
from lib.model.split import TEST
from lib.settings import PROJECT_ROOT
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


def test_folds_fitted_on_threads_give_the_same_ensemble_as_one_by_one():
    data = lexical_toy()
    serial = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0, workers=1)
    threaded = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0, workers=2)
    assert threaded.ensemble.weights == serial.ensemble.weights
    for name, expert in serial.ensemble.experts.items():
        assert np.allclose(expert.coef, threaded.ensemble.experts[name].coef, atol=1e-5)
    assert np.array_equal(threaded.predicted, serial.predicted)
    # Each lane's busy time is reported (the train stage logs it; bench_scale prints it).
    assert set(threaded.lane_seconds) == {"lexical", "dense"} and min(threaded.lane_seconds.values()) > 0


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
    card = {
        "codes": data.codes,
        "head_kind": "experts",
        "reads_text": True,
        "input_dims": {"text_dim": 8, "image_dim": 6},
        "temperature": head.report["temperature"],
        "calibration": {k: head.report[k] for k in ("slope", "intercept")},
    }
    loaded = read_model_dir(write_model_dir(tmp_path, None, card, data.lexical_features, head.ensemble))
    test = data.split == TEST
    expected = head.ensemble.logits(data.inputs(test))
    # Serving's path: raw texts in, the saved vocabulary and IDF turn them into the same rows.
    got = loaded.logits(data.text[test], data.image[test], list(data.texts[test]))
    assert np.allclose(got, expected, atol=1e-4)
    assert np.allclose(
        loaded.probabilities(data.text[test], data.image[test], list(data.texts[test])).sum(1), 1
    )


def test_averaged_fold_experts_average_each_class_over_the_folds_that_saw_it():
    f32 = np.float32
    a = LinearExpert(np.ones((2, 3), f32), np.array([1, 1, -1e4], f32), np.array([1, 1, 0], bool))
    b = LinearExpert(np.full((2, 3), 3, f32), np.array([3, 3, 5], f32), np.array([1, 1, 1], bool))
    mean = average_experts([a, b])
    assert np.allclose(mean.coef[:, :2], 2) and np.allclose(mean.intercept[:2], 2)
    # Class 2 was seen by one fold only: its score is that fold's, not dragged down by the other's "never".
    assert mean.coef[0, 2] == 3 and mean.intercept[2] == 5


def test_served_probabilities_are_the_calibrated_ones_the_report_scored():
    data = lexical_toy()
    head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0)
    calibration = Calibration(head.report["temperature"], head.report["slope"], head.report["intercept"])
    test = data.split == TEST
    probabilities = calibration.probabilities(head.ensemble.logits(data.inputs(test)))
    assert expected_calibration_error(probabilities, data.y[test]) == head.report["ece_after"]


def test_training_saving_loading_and_serving_the_experts_never_import_torch():
    # torch costs ~0.7 GB of resident memory in every process that imports it; only the MLP needs it.
    script = textwrap.dedent("""
        import sys, tempfile
        from pathlib import Path
        import numpy as np
        import jobs.classify, jobs.pipeline, serve.app
        from lib.features.lexical import LexicalSpec
        from lib.model.artifact import read_model_dir, write_model_dir
        from lib.model.dataset import Dataset, with_lexical
        from lib.model.evaluate import fit_and_test_experts
        from lib.model.experts import ExpertConfig
        from lib.model.split import assign_splits
        rng, n = np.random.default_rng(0), 150
        y = np.arange(n) % 3
        texts = np.array([f"{('rouge', 'vert', 'bleu')[k]} produit {i}" for i, k in enumerate(y)], object)
        data = Dataset(rng.normal(size=(n, 8)).astype("float32") + y[:, None], rng.normal(size=(n, 6)).astype(
            "float32"), y, assign_splits(np.arange(n), 0, 0.2, 0.2), np.arange(n), [10, 20, 30], texts=texts)
        data = with_lexical(data, LexicalSpec((1, 1), (2, 3), 1, 1000))
        head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0, workers=2)
        card = {"codes": data.codes, "head_kind": "experts", "reads_text": True, "temperature": 1.0,
                "input_dims": {"text_dim": 8, "image_dim": 6}}
        with tempfile.TemporaryDirectory() as tmp:
            model = write_model_dir(Path(tmp), None, card, data.lexical_features, head.ensemble)
            probabilities = read_model_dir(model).probabilities(data.text, data.image, list(data.texts))
        assert probabilities.shape == (n, 3) and head.report["f1_macro"] > 0.5, head.report
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
