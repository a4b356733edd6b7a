"""The retune policy of the train stage (pure)."""

from __future__ import annotations

from types import SimpleNamespace

from lib.model.stage import decide_retune
from lib.settings import Settings

PRODUCTION = SimpleNamespace(version="3")
CARD = {
    "head_kind": "experts",
    "tune_config": {"lexical_c": 1.5},
    "class_counts_train": {"10": 600, "40": 400},
}


def test_each_branch_of_the_retune_policy():
    auto = Settings(retune_policy="auto", retune_growth_fraction=0.2, head_kind="experts")
    small = decide_retune(auto, CARD, PRODUCTION, 1_100, None)  # +10 %
    assert not small.full and small.replay == {"lexical_c": 1.5} and "+10%" in small.reason
    assert decide_retune(auto, CARD, PRODUCTION, 1_250, None).full  # +25 % ≥ 20 %
    drift = {"drifted": True, "model_version": "3", "key": "monitoring/x/report.json"}
    assert "drift" in decide_retune(auto, CARD, PRODUCTION, 1_100, drift).reason
    stale = {**drift, "model_version": "2"}  # drift of an older production says nothing of this one
    assert not decide_retune(auto, CARD, PRODUCTION, 1_100, stale).full
    assert decide_retune(auto, None, None, 1_100, None).full  # no production model
    assert decide_retune(auto, {**CARD, "head_kind": "mlp"}, PRODUCTION, 1_100, None).full  # nothing to reuse
    assert decide_retune(Settings(retune_policy="always"), CARD, PRODUCTION, 1_000, None).full
    never = decide_retune(
        Settings(retune_policy="never", head_kind="experts"), CARD, PRODUCTION, 9_000, drift
    )
    assert not never.full and never.replay == CARD["tune_config"]
