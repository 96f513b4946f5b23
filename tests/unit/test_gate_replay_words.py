"""The counterfactual gate decision in words (services/common/gate_replay.py), and the policy it is taken under:
the recorded one with only the settings asked changed, out-of-range settings refused by name."""

from __future__ import annotations

import pytest

from services.common.gate_replay import Replayed, counterfactual_policy, in_words
from services.evaluator.gate import GatePolicy

RECORDED = {"target": "t", "passed": True, "evidence": {"policy": {**GatePolicy().as_dict(), "min_delta": 0.02,
                                                                   "max_bucket_drop": 0.1}}}


def test_only_the_settings_asked_change_and_out_of_range_ones_are_named():
    p = counterfactual_policy(RECORDED, min_delta=0.3, alpha=None)
    assert (p.min_delta, p.alpha, p.max_bucket_drop) == (0.3, 0.05, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        counterfactual_policy(RECORDED, alpha=1.5)
    with pytest.raises(ValueError, match="not a gate setting: judge"):
        counterfactual_policy(RECORDED, judge=1.0)


def test_a_flip_an_unchanged_decision_and_an_unreplayable_one_read_differently():
    policy = GatePolicy(min_delta=0.3, alpha=0.01)
    flipped = Replayed("g", "run-1", "t", True, rederived=True, now_passed=False, now_failed=["gate.delta_below_margin"],
                       delta=0.07, p_value=0.003, n=412, now_messages=["mean delta +0.07 is below the margin +0.30"])
    words = in_words(flipped, policy, "production:v2")
    assert words == ("under margin 0.3 and alpha 0.01 the candidate beats production:v2 by 0.070, p = 0.003, n = 412: "
                     "would NOT be promotable (gate.delta_below_margin: mean delta +0.07 is below the margin +0.30); "
                     "it was promotable")
    same = Replayed("g", "run-1", "t", True, rederived=False, now_passed=True, delta=-0.01, p_value=0.5, n=10)
    words = in_words(same, policy)
    assert "trails its baseline by 0.010" in words and words.endswith(
        "promotable, as recorded [the recorded policy does NOT re-derive the recorded decision]")
    gone = Replayed("g", "run-1", "t", False, unreplayable="audit.replay_records_unreadable: missing")
    assert in_words(gone, policy).endswith("cannot be replayed (audit.replay_records_unreadable: missing); "
                                           "the recorded decision was: not promotable")
