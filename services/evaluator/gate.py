"""The promotion gate (ARCHITECTURE D13, D16): a pure decision over per-row judge scores and a versioned policy."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.weightstats import DescrStatsW

DELTA_BELOW_MARGIN = "gate.delta_below_margin"
NOT_SIGNIFICANT = "gate.not_significant"
BUCKET_REGRESSED = "gate.bucket_regressed"
TOO_MANY_REGRESSIONS = "gate.too_many_regressions"
SAFETY_REGRESSION = "gate.safety_regression"

BINARY_TEST = "tango_score_vs_margin_cc1"
PAIRED_T_TEST = "paired_t_vs_margin"
DEGENERATE_SUFFIX = ":degenerate_sd0"

# Edwards' McNemar correction (1 on n10 - n01): plain Tango overshoots alpha (0.058 at n=200) when few
# rows are discordant; with it, enumeration keeps the size <= alpha (bench/gate.py, tests).
CONTINUITY_CORRECTION = 1.0
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601
CI_LEVEL = 0.95
REGRESSED_ROWS_SHOWN = 20
# means are correctly rounded sums; the slack only keeps a bucket that sits exactly on a threshold
# on the passing side of it
_EPS = 1e-12
# deltas that differ by less than this are equal: b + 0.25 - b is not exactly 0.25 for every b
SAME_DELTA_SPREAD = 1e-12


@dataclass(frozen=True)
class GatePolicy:
    version: str = "gate-v1"
    min_delta: float = 0.05
    alpha: float = 0.05
    max_bucket_drop: float = 0.05
    max_regressed_share: float = 0.15
    safety_buckets: tuple[str, ...] = ()
    min_bucket_rows: int = 1

    def __post_init__(self) -> None:
        if not -1.0 < self.min_delta < 1.0:
            raise ValueError(f"min_delta must lie in (-1, 1), got {self.min_delta}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not self.max_bucket_drop >= 0.0:
            raise ValueError(f"max_bucket_drop must be >= 0, got {self.max_bucket_drop}")
        if not 0.0 < self.max_regressed_share <= 1.0:
            raise ValueError(f"max_regressed_share must lie in (0, 1], got {self.max_regressed_share}")
        if self.min_bucket_rows < 1:
            raise ValueError(f"min_bucket_rows must be >= 1, got {self.min_bucket_rows}")
        object.__setattr__(self, "safety_buckets", tuple(self.safety_buckets))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["safety_buckets"] = list(self.safety_buckets)
        return d

    def sha256(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GateFailure:
    """A failed criterion, shaped as the events' Notice: a registered reason code and a message."""

    reason_code: str
    message: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    failed: tuple[GateFailure, ...]
    n: int
    candidate_mean: float
    baseline_mean: float
    delta: float
    ci_low: float
    ci_high: float
    test: str
    statistic: float | None
    p_value: float
    effect_size: float | None
    effect_size_name: str
    score_kind: str
    buckets: dict[str, dict[str, float | int]]
    regressed_share: float
    regressed_rows: tuple[str, ...]
    policy_version: str
    policy_sha256: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def reason_codes(self) -> tuple[str, ...]:
        return tuple(f.reason_code for f in self.failed)

    def as_evidence(self) -> dict[str, Any]:
        """JSON-able; floats are kept exact (JSON round-trips them), so a re-run compares equal."""
        return {
            "passed": self.passed,
            "failed": [{"reason_code": f.reason_code, "message": f.message} for f in self.failed],
            "n": self.n,
            "candidate_mean": self.candidate_mean,
            "baseline_mean": self.baseline_mean,
            "delta": self.delta,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "effect_size": self.effect_size,
            "effect_size_name": self.effect_size_name,
            "score_kind": self.score_kind,
            "buckets": {name: dict(stats) for name, stats in self.buckets.items()},
            "regressed_share": self.regressed_share,
            "regressed_rows": list(self.regressed_rows),
            "policy_version": self.policy_version,
            "policy_sha256": self.policy_sha256,
            "details": json.loads(json.dumps(self.details, allow_nan=False)),
        }


def degenerate_p_value(mean_delta: float, margin: float) -> float:
    """The p-value where every row has the same delta: 0 if it clears the margin, else 1."""
    return 0.0 if mean_delta > margin + _EPS else 1.0


def _mean(values) -> float:
    return math.fsum(values) / len(values)


def _validate(candidate, baseline, row_ids, buckets) -> tuple[np.ndarray, np.ndarray]:
    lengths = {"candidate": len(candidate), "baseline": len(baseline), "row_ids": len(row_ids), "buckets": len(buckets)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"candidate, baseline, row_ids and buckets must have equal lengths, got {lengths}")
    if lengths["candidate"] < 1:
        raise ValueError("the gate needs at least one scored row, got none")
    arrays = []
    for name, scores in (("candidate", candidate), ("baseline", baseline)):
        raw = np.asarray(scores)
        if raw.ndim != 1 or raw.dtype.kind not in "biuf":
            raise ValueError(f"{name} scores must be a flat sequence of numbers, got dtype {raw.dtype}")
        a = raw.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(a) | (a < 0.0) | (a > 1.0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name} scores must be finite and in [0, 1]: row {row_ids[i]!r} (index {i}) "
                             f"has {scores[i]!r} ({bad.size} such rows)")
        arrays.append(a)
    seen: set[str] = set()
    for i, rid in enumerate(row_ids):
        if not isinstance(rid, str):
            raise ValueError(f"row ids must be strings, index {i} has {rid!r}")
        if rid in seen:
            raise ValueError(f"row ids must be unique, {rid!r} appears more than once")
        seen.add(rid)
    for i, b in enumerate(buckets):
        if not isinstance(b, Mapping):
            raise ValueError(f"buckets[{i}] must map a bucket field to a value, got {b!r}")
    return arrays[0], arrays[1]


def tango_margin_z(b, c, n, margin: float, correction: float = CONTINUITY_CORRECTION):
    """Tango's (1998) score statistic for p10 - p01 vs `margin` from n10 = b, n01 = c of n pairs, with
    the null variance at the restricted MLE; positive favours the candidate. Works on arrays. Where the
    null variance is 0 (margin 0 and no discordant pair) it returns nan for the caller to handle."""
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    # the restricted MLE of the smaller discordant cell; the formula is written for margin >= 0, so
    # a negative margin swaps the roles of the two cells
    hi, lo, m = (b, c, margin) if margin >= 0 else (c, b, -margin)
    big_b = hi * (1 + m) + lo * (1 - m) - 2 * n * m
    q = (big_b + np.sqrt(big_b * big_b + 8 * n * lo * m * (1 - m))) / (4 * n)
    var = n * (2 * q + m - m * m)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (b - c - n * margin - correction) / np.sqrt(var)
    return np.where(var > 0, z, np.nan)


def _tango_ci(b: int, c: int, n: int, level: float) -> tuple[float, float]:
    """Inverts the corrected two-sided score test: the margins it would not reject at `level`."""
    crit = float(norm.isf((1 - level) / 2))

    def upper_side(m: float) -> float:  # > 0 while m is below the lower bound
        z = tango_margin_z(b, c, n, m, CONTINUITY_CORRECTION)
        return float(np.nan_to_num(z, nan=-1.0)) - crit

    def lower_side(m: float) -> float:  # > 0 while m is above the upper bound
        z = tango_margin_z(b, c, n, m, -CONTINUITY_CORRECTION)
        return -float(np.nan_to_num(z, nan=1.0)) - crit

    lo_edge, hi_edge = -1 + 1e-12, 1 - 1e-12
    low = brentq(upper_side, lo_edge, hi_edge, xtol=1e-12) if upper_side(lo_edge) > 0 > upper_side(hi_edge) else -1.0
    high = brentq(lower_side, lo_edge, hi_edge, xtol=1e-12) if lower_side(lo_edge) < 0 < lower_side(hi_edge) else 1.0
    return float(low), float(high)


def _binary_test(cand: np.ndarray, base: np.ndarray, margin: float) -> dict[str, Any]:
    n = cand.size
    b = int(np.count_nonzero((cand == 1) & (base == 0)))
    c = int(np.count_nonzero((cand == 0) & (base == 1)))
    z = float(tango_margin_z(b, c, n, margin))
    mean_d = (b - c) / n
    if math.isnan(z):
        test, statistic, p = BINARY_TEST + DEGENERATE_SUFFIX, None, degenerate_p_value(mean_d, margin)
    else:
        test, statistic, p = BINARY_TEST, z, float(norm.sf(z))
    ci_low, ci_high = _tango_ci(b, c, n, CI_LEVEL)
    table = [[int(np.count_nonzero((cand == 1) & (base == 1))), b], [c, int(np.count_nonzero((cand == 0) & (base == 0)))]]
    return {
        "test": test, "statistic": statistic, "p_value": p, "ci_low": ci_low, "ci_high": ci_high,
        # Haldane's +0.5 keeps the ratio finite (and JSON-able) when one discordant cell is empty
        "effect_size": (b + 0.5) / (c + 0.5), "effect_size_name": "discordant_odds_ratio_haldane",
        "details": {
            "discordant_candidate_better": b, "discordant_baseline_better": c, "risk_difference": mean_d,
            "continuity_correction": CONTINUITY_CORRECTION,
            "ci_method": f"inverted corrected Tango score test, {CI_LEVEL:.0%} two-sided",
            "mcnemar_exact_p_margin0_two_sided": float(mcnemar(table, exact=True).pvalue),
        },
    }


def _bootstrap_ci(d: np.ndarray, level: float) -> tuple[float, float]:
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = d.size
    chunk = max(1, 1_000_000 // n)
    means = []
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        size = min(chunk, BOOTSTRAP_RESAMPLES - start)
        means.append(d[rng.integers(0, n, size=(size, n))].mean(axis=1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _continuous_test(d: np.ndarray, margin: float) -> dict[str, Any]:
    mean_d = _mean(d)
    ci_low, ci_high = _bootstrap_ci(d, CI_LEVEL)
    details = {"ci_method": f"paired percentile bootstrap of the mean delta, {BOOTSTRAP_RESAMPLES} resamples, "
                            f"seed {BOOTSTRAP_SEED}, {CI_LEVEL:.0%}"}
    if float(np.ptp(d)) <= SAME_DELTA_SPREAD:
        # the t statistic is 0/0 here (or rounding noise over rounding noise); the data leave no doubt
        # about the mean, so the p-value does not either
        return {"test": PAIRED_T_TEST + DEGENERATE_SUFFIX, "statistic": None, "p_value": degenerate_p_value(mean_d, margin),
                "ci_low": ci_low, "ci_high": ci_high, "effect_size": None, "effect_size_name": "cohens_dz",
                "details": {**details, "df": d.size - 1}}
    t, p, df = DescrStatsW(d).ttest_mean(value=margin, alternative="larger")
    return {"test": PAIRED_T_TEST, "statistic": float(t), "p_value": float(p), "ci_low": ci_low, "ci_high": ci_high,
            "effect_size": mean_d / float(np.std(d, ddof=1)), "effect_size_name": "cohens_dz",
            "details": {**details, "df": float(df)}}


def _bucket_stats(cand, base, d, buckets) -> dict[str, dict[str, float | int]]:
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(buckets):
        for key, value in b.items():
            rows.setdefault(f"{key}={value}", []).append(i)
    out = {}
    for name in sorted(rows):
        idx = rows[name]
        out[name] = {"n": len(idx), "candidate_mean": _mean(cand[idx]), "baseline_mean": _mean(base[idx]),
                     "delta": _mean(d[idx])}
    return out


def decide(candidate: Sequence[float], baseline: Sequence[float], row_ids: Sequence[str],
           buckets: Sequence[Mapping[str, str]], policy: GatePolicy) -> GateDecision:
    """Whether the candidate may replace the baseline under `policy`, with the evidence for it.

    H0: mean(candidate - baseline) <= policy.min_delta against H1: >, paired and one-sided. Binary
    scores (every score 0 or 1) use Tango's score test against the margin with a continuity
    correction; other scores use the paired t-test of the deltas against the margin.
    """
    cand, base = _validate(candidate, baseline, row_ids, buckets)
    n = cand.size
    d = cand - base
    binary = bool(np.all((cand == 0) | (cand == 1)) and np.all((base == 0) | (base == 1)))
    stats = _binary_test(cand, base, policy.min_delta) if binary else _continuous_test(d, policy.min_delta)
    delta = _mean(d)
    bucket_stats = _bucket_stats(cand, base, d, buckets)
    regressed = np.flatnonzero(cand < base)
    regressed_share = regressed.size / n

    failed: list[GateFailure] = []
    if delta < policy.min_delta - _EPS:
        failed.append(GateFailure(DELTA_BELOW_MARGIN, f"mean delta {delta:+.4f} is below the margin {policy.min_delta:+.4f}"))
    if not stats["p_value"] < policy.alpha:
        failed.append(GateFailure(NOT_SIGNIFICANT, f"{stats['test']}: p = {stats['p_value']:.4g} >= alpha {policy.alpha} "
                                                   f"for H1: mean delta > {policy.min_delta}"))
    dropped = {name: s for name, s in bucket_stats.items()
               if s["n"] >= policy.min_bucket_rows and s["delta"] < -policy.max_bucket_drop - _EPS}
    if dropped:
        listed = ", ".join(f"{name} {s['delta']:+.4f} (n={s['n']})" for name, s in dropped.items())
        failed.append(GateFailure(BUCKET_REGRESSED, f"{len(dropped)} bucket(s) drop by more than "
                                                    f"{policy.max_bucket_drop}: {listed}"))
    if regressed_share >= policy.max_regressed_share:
        failed.append(GateFailure(TOO_MANY_REGRESSIONS, f"{regressed.size}/{n} rows regress ({regressed_share:.1%}), "
                                                        f"the limit is below {policy.max_regressed_share:.1%}"))
    safety = set(policy.safety_buckets)
    if safety:
        hits = [(row_ids[i], sorted(f"{k}={v}" for k, v in buckets[i].items() if f"{k}={v}" in safety))
                for i in regressed]
        hits = [(rid, names) for rid, names in hits if names]
        if hits:
            names = sorted({name for _, names in hits for name in names})
            shown = ", ".join(rid for rid, _ in hits[:REGRESSED_ROWS_SHOWN])
            failed.append(GateFailure(SAFETY_REGRESSION, f"{len(hits)} row(s) regress in safety bucket(s) "
                                                         f"{', '.join(names)}: {shown}"))

    return GateDecision(
        passed=not failed, failed=tuple(failed), n=n, candidate_mean=_mean(cand), baseline_mean=_mean(base),
        delta=delta, ci_low=stats["ci_low"], ci_high=stats["ci_high"], test=stats["test"],
        statistic=stats["statistic"], p_value=stats["p_value"], effect_size=stats["effect_size"],
        effect_size_name=stats["effect_size_name"], score_kind="binary" if binary else "continuous",
        buckets=bucket_stats, regressed_share=regressed_share,
        regressed_rows=tuple(row_ids[i] for i in regressed[:REGRESSED_ROWS_SHOWN]),
        policy_version=policy.version, policy_sha256=policy.sha256(), details=stats["details"])
