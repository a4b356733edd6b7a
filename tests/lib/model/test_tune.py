"""Choosing the winning trial (pure: stand-ins for Ray Tune's results)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lib.model.tune import TARGET, best_trial


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
