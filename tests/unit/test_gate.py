"""The promotion gate (D13): which candidates it promotes, why it refuses the others, and its calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from contracts.reason_codes import _CODES
from services.evaluator.gate import (
    BOOTSTRAP_RESAMPLES,
    BUCKET_REGRESSED,
    DELTA_BELOW_MARGIN,
    NOT_SIGNIFICANT,
    SAFETY_REGRESSION,
    TOO_MANY_REGRESSIONS,
    GatePolicy,
    bootstrap_counts,
    bootstrap_t_p_value,
    decide,
    tango_margin_z,
)

POLICY = GatePolicy()


def ids(n: int) -> list[str]:
    return [f"row-{i}" for i in range(n)]


def no_buckets(n: int) -> list[dict]:
    return [{} for _ in range(n)]


def continuous_pair(n: int, delta: float, seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = 0.3 + 0.4 * rng.random(n)
    return s + delta + noise * (rng.random(n) - 0.5), s + noise * (rng.random(n) - 0.5)


def test_clearly_better_continuous_candidate_is_promoted():
    cand, base = continuous_pair(200, 0.15)
    d = decide(cand, base, ids(200), no_buckets(200), POLICY)
    assert d.passed, d.failed
    assert d.failed == ()
    assert d.score_kind == "continuous" and d.test == "paired_t_and_bootstrap_t_vs_margin"
    # both legs reject; the reported p is the larger, here the bootstrap's smallest possible value
    assert d.p_value == max(d.details["p_paired_t"], d.details["p_bootstrap_t"]) == 1 / (BOOTSTRAP_RESAMPLES + 1)
    assert d.details["p_paired_t"] < 1e-6 and d.ci_low > 0.05 and d.ci_low <= d.delta <= d.ci_high
    assert d.effect_size_name == "cohens_dz" and d.effect_size > 1


def test_clearly_better_binary_candidate_is_promoted():
    n = 300
    base = np.array([1.0] * 180 + [0.0] * 120)
    cand = base.copy()
    cand[180:240] = 1.0  # 60 rows fixed, none broken: +0.20
    d = decide(cand, base, ids(n), no_buckets(n), POLICY)
    assert d.passed, d.failed
    assert d.score_kind == "binary" and d.test == "tango_score_vs_margin_cc1"
    assert d.delta == pytest.approx(0.2) and d.ci_low > 0.05
    assert d.details["discordant_candidate_better"] == 60 and d.details["discordant_baseline_better"] == 0


def test_equal_models_fail_on_margin_and_significance():
    cand, base = continuous_pair(200, 0.0)
    d = decide(cand, base, ids(200), no_buckets(200), POLICY)
    assert not d.passed
    assert {DELTA_BELOW_MARGIN, NOT_SIGNIFICANT} <= set(d.reason_codes)
    assert d.p_value > 0.5


def test_identical_scores_fail_without_nan():
    base = [0.4, 0.6, 0.9, 0.1]
    d = decide(base, base, ids(4), no_buckets(4), POLICY)
    assert d.test.endswith(":degenerate_sd0") and d.p_value == 1.0 and d.statistic is None
    assert set(d.reason_codes) == {DELTA_BELOW_MARGIN, NOT_SIGNIFICANT}
    json.dumps(d.as_evidence(), allow_nan=False)


def test_constant_improvement_above_margin_is_significant_by_definition():
    base = [0.2, 0.4, 0.5, 0.7, 0.3]
    cand = [b + 0.25 for b in base]
    d = decide(cand, base, ids(5), no_buckets(5), POLICY)
    assert d.test == "paired_t_and_bootstrap_t_vs_margin:degenerate_sd0" and d.p_value == 0.0 and d.passed


def test_candidate_better_overall_but_worse_in_one_bucket_names_that_bucket():
    n = 300
    cand, base = continuous_pair(n, 0.20, seed=1)
    buckets = [{"class": "bug" if i < 50 else "feature", "project": "HIVE"} for i in range(n)]
    cand[:50] = base[:50] - 0.12  # the "bug" rows get worse
    d = decide(cand, base, ids(n), buckets, GatePolicy(max_regressed_share=0.5))
    assert d.reason_codes == (BUCKET_REGRESSED,)
    message = d.failed[0].message
    assert "class=bug" in message and "class=feature" not in message and "project=HIVE" not in message
    assert d.buckets["class=bug"]["delta"] == pytest.approx(-0.12)
    assert d.buckets["class=bug"]["n"] == 50 and d.buckets["project=HIVE"]["n"] == n


def test_small_buckets_below_min_rows_are_not_judged():
    n = 300
    cand, base = continuous_pair(n, 0.20, seed=1)
    buckets = [{"class": "rare" if i < 3 else "common"} for i in range(n)]
    cand[:3] = base[:3] - 0.3
    policy = GatePolicy(min_bucket_rows=10)
    assert decide(cand, base, ids(n), buckets, policy).passed
    assert BUCKET_REGRESSED in decide(cand, base, ids(n), buckets, GatePolicy()).reason_codes


def test_bucket_drop_exactly_at_the_limit_passes():
    n = 400
    base = np.array([0.0] * 200 + [1.0] * 200)
    cand = base.copy()
    cand[:180] = 1.0  # 180 fixed rows in "a"
    cand[200:201] = 0.0  # 1 of 20 rows of "b" broken: "b" drops by exactly 0.05
    buckets = [{"g": "a"} if i < 200 or i >= 220 else {"g": "b"} for i in range(n)]
    d = decide(cand, base, ids(n), buckets, POLICY)
    assert d.buckets["g=b"]["delta"] == -0.05
    assert BUCKET_REGRESSED not in d.reason_codes and d.passed


def test_too_many_regressed_rows_fail_even_when_the_mean_improves():
    n = 200
    rng = np.random.default_rng(3)
    base = 0.2 + 0.5 * rng.random(n)
    cand = base + 0.3
    cand[:40] = base[:40] - 0.01  # 20% of rows slightly worse
    d = decide(cand, base, ids(n), no_buckets(n), POLICY)
    assert d.reason_codes == (TOO_MANY_REGRESSIONS,)
    assert d.regressed_share == pytest.approx(0.2)
    assert d.regressed_rows == tuple(f"row-{i}" for i in range(20))


def test_one_regressed_row_in_a_safety_bucket_fails():
    n = 200
    cand, base = continuous_pair(n, 0.2, seed=4, noise=0.01)
    buckets = [{"class": "urgent" if i % 10 == 0 else "normal"} for i in range(n)]
    cand[30] = base[30] - 0.01
    policy = GatePolicy(safety_buckets=("class=urgent",))
    d = decide(cand, base, ids(n), buckets, policy)
    assert d.reason_codes == (SAFETY_REGRESSION,)
    assert "row-30" in d.failed[0].message and "class=urgent" in d.failed[0].message
    # the same regression outside the safety bucket is allowed
    cand[30], cand[31] = base[30] + 0.2, base[31] - 0.01
    assert decide(cand, base, ids(n), buckets, policy).passed


def test_binary_scores_use_the_margin_score_test_and_others_the_t_and_bootstrap_t():
    base = [1, 0, 1, 1, 0, 0, 1, 0] * 10
    cand = [1, 1, 1, 1, 0, 1, 1, 0] * 10
    d = decide(cand, base, ids(80), no_buckets(80), POLICY)
    assert d.score_kind == "binary" and d.test.startswith("tango_score_vs_margin")
    assert d.effect_size_name == "discordant_odds_ratio_haldane" and d.effect_size == pytest.approx(20.5 / 0.5)
    assert "mcnemar_exact_p_margin0_two_sided" in d.details
    almost = [float(x) for x in cand]
    almost[0] = 0.99
    d2 = decide(almost, base, ids(80), no_buckets(80), POLICY)
    assert d2.score_kind == "continuous" and d2.test == "paired_t_and_bootstrap_t_vs_margin"


def test_binary_p_value_matches_the_hand_computed_score_statistic():
    # n10 = 30, n01 = 5 of 200: the restricted MLE of p01 solves 2n q^2 - B q - n01 m (1 - m) = 0
    n, b, c, m = 200, 30, 5, 0.05
    big_b = b * (1 + m) + c * (1 - m) - 2 * n * m
    q = (big_b + math.sqrt(big_b ** 2 + 8 * n * c * m * (1 - m))) / (4 * n)
    z = (b - c - n * m - 1) / math.sqrt(n * (2 * q + m - m * m))
    cand = [1] * b + [0] * c + [1] * 100 + [0] * (n - b - c - 100)
    base = [0] * b + [1] * c + [1] * 100 + [0] * (n - b - c - 100)
    d = decide(cand, base, ids(n), no_buckets(n), POLICY)
    assert d.statistic == pytest.approx(z, rel=1e-12)
    assert d.delta == pytest.approx(0.125)


@pytest.mark.parametrize("candidate, baseline, row_ids, message", [
    ([0.5, 0.6], [0.5], ["a", "b"], "equal lengths"),
    ([1.5], [0.5], ["a"], "in \\[0, 1\\]"),
    ([float("nan")], [0.5], ["a"], "finite"),
    ([0.5], [float("inf")], ["a"], "finite"),
    ([0.5, 0.6], [0.5, 0.4], ["a", "a"], "unique"),
    ([], [], [], "at least one"),
    (["0.5"], [0.5], ["a"], "numbers"),
])
def test_invalid_inputs_are_refused(candidate, baseline, row_ids, message):
    with pytest.raises(ValueError, match=message):
        decide(candidate, baseline, row_ids, no_buckets(len(row_ids)), POLICY)


def test_bucket_list_of_another_length_is_refused():
    with pytest.raises(ValueError, match="equal lengths"):
        decide([0.5], [0.4], ["a"], [], POLICY)


def test_the_same_inputs_give_the_same_evidence_and_it_is_json():
    n = 150
    cand, base = continuous_pair(n, 0.08, seed=5, noise=0.3)
    buckets = [{"class": "abc"[i % 3]} for i in range(n)]
    policy = GatePolicy(safety_buckets=("class=a",))
    first = decide(cand, base, ids(n), buckets, policy).as_evidence()
    again = decide(list(cand), list(base), ids(n), buckets, policy).as_evidence()
    assert first == again
    text = json.dumps(first, allow_nan=False, sort_keys=True)
    assert json.loads(text) == first
    assert first["policy_sha256"] == policy.sha256() and first["policy_version"] == "gate-v2"


def test_policy_hash_changes_with_any_field():
    assert GatePolicy().sha256() == GatePolicy().sha256()
    assert GatePolicy(min_delta=0.04).sha256() != GatePolicy().sha256()
    assert GatePolicy(safety_buckets=("class=urgent",)).sha256() != GatePolicy().sha256()
    assert GatePolicy().as_dict()["safety_buckets"] == []


def test_every_gate_reason_code_is_registered():
    registered = {c.code for c in _CODES}
    assert {DELTA_BELOW_MARGIN, NOT_SIGNIFICANT, BUCKET_REGRESSED, TOO_MANY_REGRESSIONS, SAFETY_REGRESSION} <= registered


def _gate_p_continuous(cand: np.ndarray, base: np.ndarray, m: float) -> tuple[np.ndarray, np.ndarray]:
    """decide()'s continuous p-value, vectorised over replications (rows): max(paired t, bootstrap-t);
    also the t-test's p alone."""
    n = cand.shape[1]
    d = cand - base
    mean = d.mean(axis=1)
    tstat = (mean - m) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    p_t = student_t.sf(tstat, n - 1)
    counts = bootstrap_counts(n).T
    centred = d - mean[:, None]
    p_boot = np.concatenate([
        bootstrap_t_p_value(tstat[i:i + 500], centred[i:i + 500] @ counts, (centred[i:i + 500] ** 2) @ counts, n)
        for i in range(0, d.shape[0], 500)])
    return np.maximum(p_t, p_boot), p_t


def test_false_promotion_rate_at_the_margin_stays_within_alpha_for_n_200():
    """Simulated at true delta = min_delta exactly; the vectorised statistic is the one decide() uses
    (checked on the first replications)."""
    rng = np.random.default_rng(11)
    reps, n, m = 4000, 200, POLICY.min_delta
    # binary: production right on 70% of rows, the two disagree on 20%, p10 - p01 = m
    p10, p01 = (0.2 + m) / 2, (0.2 - m) / 2
    counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=reps)
    z = tango_margin_z(counts[:, 0], counts[:, 1], n, m)
    binary_rate = float(np.mean(norm.sf(z) < POLICY.alpha))
    # continuous: symmetric per-row noise, no clipping, so the true mean delta is exactly m
    s = 0.25 + 0.35 * rng.random((reps, n))
    base = s + 0.25 * (rng.random((reps, n)) - 0.5)
    cand = s + m + 0.25 * (rng.random((reps, n)) - 0.5)
    p, _ = _gate_p_continuous(cand, base, m)
    continuous_rate = float(np.mean(p < POLICY.alpha))
    policy = GatePolicy(max_regressed_share=1.0)
    for k in range(20):
        decision = decide(cand[k], base[k], ids(n), no_buckets(n), policy)
        assert decision.p_value == pytest.approx(p[k], rel=1e-9, abs=1e-12)
        b, c = counts[k, 0], counts[k, 1]
        as_rows = decide([1] * b + [0] * c + [1] * (n - b - c), [0] * b + [1] * c + [1] * (n - b - c), ids(n),
                         no_buckets(n), policy)
        assert as_rows.p_value == pytest.approx(norm.sf(z[k]), rel=1e-12)
    tolerance = 3 * math.sqrt(0.05 * 0.95 / reps)  # Monte Carlo error, about 0.01
    assert binary_rate <= POLICY.alpha + tolerance
    assert continuous_rate <= POLICY.alpha + tolerance


def test_left_skewed_deltas_at_the_margin_are_not_promoted_too_often():
    """A candidate a bit better on 90% of rows and much worse on 10% (deltas +0.09 / -0.31 +- 0.01,
    mean exactly the margin): the t-test alone promotes it far more often than alpha, the gate's
    t-test + bootstrap-t does not (bench/gate.py measures this at n = 50, 200, 1000)."""
    rng = np.random.default_rng(12)
    reps, n, m = 4000, 200, POLICY.min_delta
    base = 0.35 + 0.5 * rng.random((reps, n))
    d = m + np.where(rng.random((reps, n)) < 0.1, -0.36, 0.04) + 0.02 * (rng.random((reps, n)) - 0.5)
    cand = base + d
    p, p_t = _gate_p_continuous(cand, base, m)
    at_margin = d.mean(axis=1) >= m  # the gate also refuses a mean delta below the margin
    gate_rate = float(np.mean((p < POLICY.alpha) & at_margin))
    t_rate = float(np.mean((p_t < POLICY.alpha) & at_margin))
    policy = GatePolicy(max_regressed_share=1.0)
    for k in range(20):
        decision = decide(cand[k], base[k], ids(n), no_buckets(n), policy)
        assert decision.p_value == pytest.approx(p[k], rel=1e-9, abs=1e-12)
        assert decision.details["p_paired_t"] == pytest.approx(p_t[k], rel=1e-9, abs=1e-12)
        assert decision.passed == bool(p[k] < POLICY.alpha and at_margin[k])
    tolerance = 3 * math.sqrt(0.05 * 0.95 / reps)
    assert t_rate > POLICY.alpha + tolerance  # the simulation does stress the t-test
    assert gate_rate <= POLICY.alpha + tolerance


def test_a_few_large_regressions_are_not_outvoted_by_many_small_gains():
    # 48 rows +0.09, 2 rows -0.31: mean +0.074, 4% of rows regress; the t-test alone says p = 0.02
    base = np.linspace(0.4, 0.6, 50)
    d = np.full(50, 0.09) + np.linspace(-0.005, 0.005, 50)
    d[[7, 31]] = -0.31
    d = d.round(6)
    dec = decide(base + d, base, ids(50), no_buckets(50), POLICY)
    assert dec.details["p_paired_t"] < POLICY.alpha <= dec.details["p_bootstrap_t"]
    assert dec.p_value == dec.details["p_bootstrap_t"] and dec.reason_codes == (NOT_SIGNIFICANT,)
    assert "paired_t_and_bootstrap_t_vs_margin" in dec.failed[0].message


def test_the_bootstrap_p_value_is_the_same_for_the_same_deltas_and_handles_ties():
    # a 5-point judge scale: deltas are multiples of 0.25 and tie a lot
    rng = np.random.default_rng(8)
    base = 0.25 * rng.integers(1, 4, 120)
    cand = base + 0.25 * rng.choice([-1, 0, 1], 120, p=[0.1, 0.5, 0.4])
    first = decide(cand, base, ids(120), no_buckets(120), POLICY)
    again = decide(list(cand), list(base), ids(120), no_buckets(120), POLICY)
    assert first.p_value == again.p_value and first.details == again.details
    assert 0 < first.details["p_bootstrap_t"] <= 1 and first.p_value >= first.details["p_paired_t"]
    json.dumps(first.as_evidence(), allow_nan=False)


def test_a_constant_delta_exactly_at_the_margin_is_not_promoted_by_rounding_noise():
    base = [0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8]
    cand = [b + 0.05 for b in base]  # the float deltas differ in the last bits
    d = decide(cand, base, ids(7), no_buckets(7), POLICY)
    assert d.test == "paired_t_and_bootstrap_t_vs_margin:degenerate_sd0" and d.p_value == 1.0 and not d.passed
    assert d.reason_codes == (NOT_SIGNIFICANT,)
