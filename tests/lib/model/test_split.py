"""Train / validation / test assignment by productid hash."""

from __future__ import annotations

import numpy as np
import pytest

from lib.model.split import TEST, TRAIN, VAL, assign_splits


def test_splits_are_stable_and_roughly_stratified():
    ids = np.arange(20_000)
    first = assign_splits(ids, 0, 0.15, 0.15)
    assert (
        assign_splits(ids[:5000], 0, 0.15, 0.15) == first[:5000]
    ).all()  # new products don't move old ones
    shares = {name: (first == name).mean() for name in (TRAIN, VAL, TEST)}
    assert shares[TRAIN] == pytest.approx(0.70, abs=0.02) and shares[TEST] == pytest.approx(0.15, abs=0.02)
    assert (assign_splits(ids, 1, 0.15, 0.15) != first).any()
