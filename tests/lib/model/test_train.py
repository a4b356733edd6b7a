"""Pure training logic: configs, optimizer wiring, class weights, test-split isolation, promotion rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lib.features.lexical import LexicalSpec
from lib.model.artifact import read_model_dir, write_model_dir
from lib.model.dataset import Dataset, build_dataset, with_lexical
from lib.model.network import FusionConfig, MultimodalMLP, load_trained, predict_logits
from lib.model.split import TEST, TRAIN, assign_splits
from lib.model.train import (
    TrainConfig,
    balanced_class_weights,
    configs_from_trial,
    make_optimizer,
    train_model,
)

LEXICAL_SPEC = LexicalSpec(word_ngrams=(1, 2), char_ngrams=(2, 4), min_df=2, max_features=2000)

TRIAL = {"lr": 3.3e-4, "weight_decay": 0.042, "batch_size": 64, "dropout": 0.25, "hidden1": 64,
         "hidden2": 32, "hidden3": 16, "activation": "silu"}  # fmt: skip


def toy_dataset(n: int = 600, classes: int = 4, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centroids = rng.normal(size=(classes, 8))
    text = (centroids[y] + rng.normal(scale=0.8, size=(n, 8))).astype(np.float32)
    image = (centroids[y][:, :6] + rng.normal(scale=2.0, size=(n, 6))).astype(np.float32)
    productid = np.arange(1000, 1000 + n)
    # Each class has its own reference code (what sentence encoders blur); the other words are noise.
    noise = ["lot", "neuf", "couleur", "taille", "garantie", "promo", "original", "qualité"]
    texts = np.array([f"article ref-{c}{c}{c}x " + " ".join(rng.choice(noise, 3)) for c in y], dtype=object)
    return Dataset(text, image, y.astype(np.int64), assign_splits(productid, 0, 0.15, 0.15), productid,
                   list(range(10, 10 + classes)), texts=texts)  # fmt: skip


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


def test_balanced_class_weights():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_lexical_block_sees_only_the_training_split_and_test_texts_change_nothing():
    data = toy_dataset()
    poisoned_texts = data.texts.copy()
    poisoned_texts[data.split != TRAIN] = "zzqx poison words everywhere zzqx"
    clean = with_lexical(data, LEXICAL_SPEC)
    dirty = with_lexical(Dataset(**{**data.__dict__, "texts": poisoned_texts}), LEXICAL_SPEC)
    for a, b in zip(clean.lexical_features.vectorizers, dirty.lexical_features.vectorizers, strict=True):
        assert a.vocabulary_ == b.vocabulary_ and np.array_equal(a.idf_, b.idf_)
    assert "zzqx" not in clean.lexical_features.vectorizers[0].vocabulary_
    # Validation texts feed early stopping and selection; test texts must not: poison test only.
    test_only = data.texts.copy()
    test_only[data.split == TEST] = "zzqx poison"
    dirty = with_lexical(Dataset(**{**data.__dict__, "texts": test_only}), LEXICAL_SPEC)
    model_config, train_config = configs_from_trial(
        {**TRIAL, "lexical_proj": 8},
        8,
        6,
        4,
        TrainConfig(max_epochs=3, seed=1),
        lexical_dim=clean.lexical_dim,
    )
    a, b = train_model(clean, model_config, train_config), train_model(dirty, model_config, train_config)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]


def lexical_only(data: Dataset, max_epochs: int, **trial) -> tuple[FusionConfig, TrainConfig]:
    """Configs of a head that reads the TF-IDF block alone (toy dimensions)."""
    base = TrainConfig(max_epochs=max_epochs)
    return configs_from_trial({**TRIAL, **trial}, 8, 6, 4, base, "lexical", data.lexical_dim)


def test_lexical_head_learns_from_the_text_alone_and_round_trips_through_the_model_files(tmp_path):
    data = with_lexical(toy_dataset(), LEXICAL_SPEC)
    model_config, train_config = lexical_only(data, 8, lr=3e-3, lexical_proj=16, lexical_wide=True)
    result = train_model(data, model_config, train_config)
    assert result.best_val["val_f1_macro"] > 0.95  # the reference codes give the class away
    model = load_trained(model_config, result.state_dict)
    text, image, _ = data.part(TEST)
    expected = predict_logits(model, text, image, data.lexical_part(TEST))
    card = {"codes": data.codes, "model_config": model_config.to_dict()}
    loaded = read_model_dir(write_model_dir(tmp_path, result.state_dict, card, data.lexical_features))
    # Serving's path: raw texts in, the saved vocabulary and IDF turn them into the same rows.
    assert np.allclose(loaded.logits(text, image, data.texts_part(TEST)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="text"):
        loaded.logits(text, image)


def test_wide_only_lexical_head_is_a_linear_model_over_the_tfidf_block():
    data = with_lexical(toy_dataset(), LEXICAL_SPEC)
    model_config, train_config = lexical_only(data, 10, lr=1e-2, lexical_proj=0, lexical_wide=True)
    model = MultimodalMLP(model_config)
    assert model.body is None and model.lexical is None and model.wide is not None
    result = train_model(data, model_config, train_config)
    assert result.best_val["val_f1_macro"] > 0.95


def test_a_label_correction_changes_the_data_fingerprint():
    """Training is skipped on an unchanged fingerprint: a batch that only fixes labels must change it."""
    rows = pd.DataFrame({"productid": [1, 2, 3], "prdtypecode": [10, 20, 10], "embed_hash": ["a", "b", "c"],
                         "text_emb": [np.zeros(2)] * 3, "image_emb": [np.zeros(2)] * 3})  # fmt: skip
    corrected = rows.assign(prdtypecode=[10, 20, 20])
    fingerprint = build_dataset(rows, 2, 2, 0, 0.15, 0.15).fingerprint
    assert build_dataset(corrected, 2, 2, 0, 0.15, 0.15).fingerprint != fingerprint
    assert build_dataset(rows.copy(), 2, 2, 0, 0.15, 0.15).fingerprint == fingerprint
