"""Pure training logic: configs, optimizer wiring, class weights, test-split isolation, promotion rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.model import FusionConfig, MultimodalMLP
from lib.registry import decide_promotion
from lib.split import TEST, TRAIN, VAL, assign_splits
from lib.train import (
    Dataset,
    TrainConfig,
    balanced_class_weights,
    configs_from_trial,
    make_optimizer,
    train_model,
)

TRIAL = {"lr": 3.3e-4, "weight_decay": 0.042, "batch_size": 64, "dropout": 0.25, "hidden1": 64,
         "hidden2": 32, "hidden3": 16, "activation": "silu"}  # fmt: skip


def toy_dataset(n: int = 600, classes: int = 4, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centroids = rng.normal(size=(classes, 8))
    text = (centroids[y] + rng.normal(scale=0.8, size=(n, 8))).astype(np.float32)
    image = (centroids[y][:, :6] + rng.normal(scale=2.0, size=(n, 6))).astype(np.float32)
    productid = np.arange(1000, 1000 + n)
    return Dataset(text, image, y.astype(np.int64), assign_splits(productid, 0, 0.15, 0.15), productid,
                   list(range(10, 10 + classes)))  # fmt: skip


def test_sampled_lr_and_weight_decay_reach_the_optimizer():
    model_config, train_config = configs_from_trial(TRIAL, 8, 6, 4, TrainConfig())
    optimizer = make_optimizer(MultimodalMLP(model_config), train_config)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(TRIAL["lr"])
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(TRIAL["weight_decay"])
    result = train_model(
        toy_dataset(), model_config, TrainConfig(**{**train_config.__dict__, "max_epochs": 1})
    )
    assert result.optimizer_hparams == {
        "lr": pytest.approx(TRIAL["lr"]),
        "weight_decay": pytest.approx(0.042),
    }
    assert model_config.hidden == (64, 32, 16) and model_config.activation == "silu"
    assert model_config.dropout == 0.25 and train_config.batch_size == 64


def test_the_test_split_never_feeds_training_or_selection():
    data = toy_dataset()
    model_config, train_config = configs_from_trial(TRIAL, 8, 6, 4, TrainConfig(max_epochs=4, seed=1))
    clean = train_model(data, model_config, train_config)
    poisoned = Dataset(
        data.text.copy(), data.image.copy(), data.y.copy(), data.split, data.productid, data.codes
    )
    test = poisoned.split == TEST
    poisoned.text[test] = np.nan  # any read of a test row would turn losses/weights into NaN
    poisoned.y[test] = 0
    dirty = train_model(poisoned, model_config, train_config)
    assert [h["val_loss"] for h in clean.history] == [h["val_loss"] for h in dirty.history]
    assert all(torch.equal(clean.state_dict[k], dirty.state_dict[k]) for k in clean.state_dict)


def test_training_learns_and_keeps_the_best_val_epoch():
    data = toy_dataset()
    model_config, train_config = configs_from_trial({**TRIAL, "lr": 3e-3}, 8, 6, 4, TrainConfig(max_epochs=8))
    result = train_model(data, model_config, train_config)
    best = max(h["val_f1_macro"] for h in result.history)
    assert result.best_val["val_f1_macro"] == best > 0.6
    assert result.history[result.best_epoch - 1]["val_f1_macro"] == best


def test_early_stopping_on_val_loss():
    data = toy_dataset()
    model_config, train_config = configs_from_trial(
        {**TRIAL, "lr": 1e-2}, 8, 6, 4, TrainConfig(max_epochs=60, patience=2)
    )
    result = train_model(data, model_config, train_config)
    assert len(result.history) < 60


def test_single_modality_heads_read_only_their_input():
    config = FusionConfig(text_dim=8, image_dim=6, n_classes=3, hidden=(4, 4, 4), modality="image")
    model = MultimodalMLP(config).eval()
    image = torch.randn(5, 6)
    out_a = model(torch.randn(5, 8), image)
    out_b = model(torch.randn(5, 8), image)
    assert torch.equal(out_a, out_b) and out_a.shape == (5, 3)


def test_balanced_class_weights():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_splits_are_stable_and_roughly_stratified():
    ids = np.arange(20_000)
    first = assign_splits(ids, 0, 0.15, 0.15)
    assert (
        assign_splits(ids[:5000], 0, 0.15, 0.15) == first[:5000]
    ).all()  # new products don't move old ones
    shares = {name: (first == name).mean() for name in (TRAIN, VAL, TEST)}
    assert shares[TRAIN] == pytest.approx(0.70, abs=0.02) and shares[TEST] == pytest.approx(0.15, abs=0.02)
    assert (assign_splits(ids, 1, 0.15, 0.15) != first).any()


def test_promotion_needs_a_strict_improvement():
    assert decide_promotion(0.80, None)[0]
    assert decide_promotion(0.81, 0.80)[0]
    assert not decide_promotion(0.80, 0.80)[0]
    assert not decide_promotion(0.70, 0.80)[0]


def test_temperature_scaling_recovers_overconfidence_and_lowers_ece():
    from lib.metrics import expected_calibration_error
    from lib.train import fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])  # labels drawn from calibrated probs
    overconfident = true_logits * 3.0  # what an over-fitted head emits
    t = fit_temperature(overconfident[:2000], y[:2000])
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(overconfident[2000:]), y[2000:])
    after = expected_calibration_error(softmax(overconfident[2000:], t), y[2000:])
    assert after < before / 2
