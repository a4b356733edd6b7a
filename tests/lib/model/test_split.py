"""Train / validation / test assignment by productid hash."""

from __future__ import annotations

import numpy as np
import pytest

from lib.model.split import TEST, TRAIN, VAL, assign_splits, stratified_subsample


def test_splits_are_stable_and_roughly_stratified():
    ids = np.arange(20_000)
    first = assign_splits(ids, 0, 0.15, 0.15)
    assert (
        assign_splits(ids[:5000], 0, 0.15, 0.15) == first[:5000]
    ).all()  # new products don't move old ones
    shares = {name: (first == name).mean() for name in (TRAIN, VAL, TEST)}
    assert shares[TRAIN] == pytest.approx(0.70, abs=0.02) and shares[TEST] == pytest.approx(0.15, abs=0.02)
    assert (assign_splits(ids, 1, 0.15, 0.15) != first).any()


def test_a_stratified_subsample_keeps_each_class_share_and_every_class():
    y = np.array([0] * 900 + [1] * 90 + [2] * 10 + [3])
    rows = stratified_subsample(y, 100, seed=0)
    assert np.all(np.diff(rows) > 0)  # sorted, no repeats
    counts = np.bincount(y[rows], minlength=4)
    assert list(counts) == [90, 9, 1, 1]  # shares kept; the single product of class 3 too
    assert np.array_equal(stratified_subsample(y, 100, seed=0), rows)  # deterministic
    assert len(stratified_subsample(y, 5000, seed=0)) == len(y)  # under the cap: every row
