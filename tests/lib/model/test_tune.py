"""Choosing the winning trial (pure: stand-ins for Ray Tune's results) and the trials' sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.model.dataset import with_lexical
from lib.model.split import TEST
from lib.model.tune import TARGET, best_trial, tuning_sample
from tests.lib.model.test_train import LEXICAL_SPEC, toy_dataset


@dataclass
class Trial:  # stands in for ray.tune.Result: only its reported scores matter here
    config: dict
    scores: list[float]

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({TARGET: self.scores})

    @property
    def metrics(self) -> dict:
        return {TARGET: self.scores[-1]}


def test_an_experts_trial_stopped_after_a_lucky_first_fold_does_not_win():
    """Seen in bench_quality: the winner was a trial ASHA had stopped after one fold (its score on a fifth
    of the products), not the best of the trials scored on every product."""
    lucky, steady = Trial({"c": 1}, [0.80]), Trial({"c": 2}, [0.74, 0.75, 0.75, 0.76, 0.755])
    best, score = best_trial([lucky, steady], experts=True, rounds=5)
    assert best is steady and score == 0.755


def test_an_mlp_trial_is_scored_by_its_best_epoch():
    class Results(list):  # ray.tune.ResultGrid: iterable, with get_best_result
        def get_best_result(self, metric, mode, scope):
            assert (metric, mode, scope) == (TARGET, "max", "all")
            return max(self, key=lambda r: max(r.scores))

    early_peak, late = Trial({"c": 1}, [0.6, 0.78, 0.7]), Trial({"c": 2}, [0.5, 0.7, 0.75])
    best, score = best_trial(Results([early_peak, late]), experts=False, rounds=3)
    assert best is early_peak and score == 0.78


def test_trials_get_only_a_stratified_sample_of_train_and_val():
    """At full size the whole dataset in the object store spilled 1 GB: a trial gets its sample only."""
    data = with_lexical(toy_dataset(n=2000), LEXICAL_SPEC)
    sample = tuning_sample(data, max_rows=500, seed=0)
    assert abs(len(sample.y) - 500) <= 4 and TEST not in set(sample.split)
    assert sample.texts is None and sample.lexical_features is None
    assert sample.lexical.shape == (len(sample.y), data.lexical_dim)
    index = {p: i for i, p in enumerate(data.productid)}
    rows = np.array([index[p] for p in sample.productid])
    assert (data.split[rows] == sample.split).all() and (data.y[rows] == sample.y).all()
    assert np.array_equal(data.text[rows], sample.text)
    pool = data.y[data.split != TEST]
    assert np.allclose(np.bincount(sample.y) / len(sample.y), np.bincount(pool) / len(pool), atol=0.02)
