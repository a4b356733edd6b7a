"""Train / validation / test assignment by a stable hash of the productid.

A product keeps its split forever (for a given seed), whatever batches arrive later, so the test split
never leaks into training after an update. Every class gets each fraction in expectation.
"""

from __future__ import annotations

import hashlib

import numpy as np

TRAIN, VAL, TEST = "train", "val", "test"


def unit_hash(productid: int, seed: int) -> float:
    """A uniform number in [0, 1) determined by (seed, productid) only."""
    digest = hashlib.blake2b(f"{seed}:{int(productid)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(productids: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """``"train" | "val" | "test"`` for each productid."""
    u = np.array([unit_hash(p, seed) for p in productids])
    return np.where(u < test_fraction, TEST, np.where(u < test_fraction + val_fraction, VAL, TRAIN))


def stratified_subsample(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ~``max_rows`` rows keeping each class's share (every class keeps at least
    one row); all rows when there are no more than ``max_rows``."""
    if len(y) <= max_rows:
        return np.arange(len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    keep = []
    for label in np.unique(y):
        members = order[y[order] == label]
        keep.append(members[: max(1, round(len(members) * max_rows / len(y)))])
    return np.sort(np.concatenate(keep))
