"""The promotion gate (ARCHITECTURE D13, D16): a pure decision over per-row judge scores and a versioned policy.

H0: mean(candidate - baseline) <= min_delta against H1: >, paired and one-sided, on the same rows.
Which test runs depends on the scores:

- binary (every score 0 or 1): Tango's score test of p10 - p01 against the margin with Edwards'
  continuity correction (`tango_score_vs_margin_cc1`). Its exact size is enumerable and stays below
  alpha (bench/gate.py).
- continuous (anything else): the candidate is promoted only if BOTH the paired t-test of the deltas
  against the margin (statsmodels `DescrStatsW.ttest_mean(value=min_delta, alternative="larger")`)
  AND a studentized bootstrap (bootstrap-t) of the same statistic reject; the reported p-value is
  the larger of the two (`paired_t_and_bootstrap_t_vs_margin`; each leg's p is in `details`).
  Why: the t-test alone runs hot when the deltas are left-skewed - a candidate a little better on
  most rows and much worse on a few - because a sample that happens to hold few of the big losses
  has both a high mean and a small sd: at true delta = margin it promotes 0.11 / 0.08 / 0.06 of
  such candidates at n = 50 / 200 / 1000, where alpha is 0.05. The bootstrap-t takes the t
  statistic's null distribution from the rows themselves, skew included, and brings that to
  0.005 / 0.046 / 0.049. Alone it runs a little hot on symmetric heavy tails at small n (0.058 at
  n = 50), where the t-test is conservative; requiring both (an intersection-union test: valid at
  alpha wherever either leg is) keeps every null shape in bench/gate.py (symmetric, left- and
  right-skewed, heavy-tailed, bimodal, 5-point scale; n = 50, 200, 1000) at alpha within Monte
  Carlo error, for about one point of power at n = 50 (0.70 vs 0.71 at true delta 0.10) and none
  at n >= 200. The bootstrap's resamples come from a fixed seed, so the same deltas always give
  the same p-value and any decision can be re-derived.
- every row with the same delta (either kind): no test is needed; p is 0 if the delta clears the
  margin and 1 otherwise (`...:degenerate_sd0`).
"""

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
CONTINUOUS_TEST = "paired_t_and_bootstrap_t_vs_margin"
DEGENERATE_SUFFIX = ":degenerate_sd0"

# Edwards' McNemar correction (1 on n10 - n01): plain Tango overshoots alpha (0.058 at n=200) when few
# rows are discordant; with it, enumeration keeps the size <= alpha (bench/gate.py, tests).
CONTINUITY_CORRECTION = 1.0
# one set of resamples serves the bootstrap-t p-value and the percentile CI; with 1999 the p-value
# (1 + exceedances) / (B + 1) is a multiple of 1/2000, so p < alpha means at most 98 exceedances
BOOTSTRAP_RESAMPLES = 1999
BOOTSTRAP_SEED = 20240601
_BOOTSTRAP_CHUNK_CELLS = 1_000_000  # resampled rows drawn at once
# a resample's mean that differs from the sample's by less than this is the sample's mean, and a
# resample's t within this (relative) of the observed t ties with it and counts against promotion:
# discrete scores make exact ties common, and rounding must not decide them
_RESAMPLE_SHIFT_TIE = 1e-12
_T_TIE = 1e-9
CI_LEVEL = 0.95
REGRESSED_ROWS_SHOWN = 20
# means are correctly rounded sums; the slack only keeps a bucket that sits exactly on a threshold
# on the passing side of it
_EPS = 1e-12
# deltas that differ by less than this are equal: b + 0.25 - b is not exactly 0.25 for every b
SAME_DELTA_SPREAD = 1e-12


@dataclass(frozen=True)
class GatePolicy:
    version: str = "gate-v2"  # v2: continuous scores need the t-test and a bootstrap-t to reject (v1: the t-test alone)
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


def bootstrap_index_chunks(n: int):
    """The row indices of the gate's bootstrap resamples for n rows, in chunks of (resamples, n):
    the same for every call, so a decision can be re-derived."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        yield rng.integers(0, n, size=(min(chunk, BOOTSTRAP_RESAMPLES - start), n))


def bootstrap_counts(n: int) -> np.ndarray:
    """(BOOTSTRAP_RESAMPLES, n): how often each row is drawn into each resample of
    `bootstrap_index_chunks(n)`; a vectorised replay (bench, tests) sums resamples as counts @ values."""
    out = []
    for idx in bootstrap_index_chunks(n):
        size = idx.shape[0]
        flat = (idx + n * np.arange(size)[:, None]).ravel()
        out.append(np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64))
    return np.concatenate(out)


def bootstrap_t_p_value(t_obs, s1, s2, n: int):
    """The one-sided studentized-bootstrap p-value (1 + #{b: T*_b >= t_obs}) / (B + 1), with
    T*_b = (mean*_b - mean) / se*_b, from the sums over each resample of the centred deltas (s1) and
    of their squares (s2). Works on arrays: t_obs of shape (...) and s1, s2 of shape (..., B). A
    resample whose rows all have the same delta has se* = 0 and T* = +-inf by the sign of its shift."""
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    t_obs = np.asarray(t_obs, dtype=np.float64)[..., None]
    shift = s1 / n
    se = np.sqrt(np.maximum((s2 / n - shift * shift) * (n / (n - 1)), 0.0) / n)
    shift = np.where(np.abs(shift) <= _RESAMPLE_SHIFT_TIE, 0.0, shift)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = np.where(shift == 0.0, 0.0, shift / se)
    exceed = np.count_nonzero(t_star >= t_obs - _T_TIE * np.maximum(1.0, np.abs(t_obs)), axis=-1)
    return (1.0 + exceed) / (s1.shape[-1] + 1.0)


def observed_t(mean_d: float, t: float, margin: float) -> float:
    """The t statistic the bootstrap compares with: 0 where the mean delta is the margin up to rounding."""
    return 0.0 if abs(mean_d - margin) <= _EPS else t


def _continuous_test(d: np.ndarray, margin: float) -> dict[str, Any]:
    n = d.size
    mean_d = _mean(d)
    centred = d - mean_d
    s1 = np.empty(BOOTSTRAP_RESAMPLES)
    s2 = np.empty(BOOTSTRAP_RESAMPLES)
    done = 0
    for idx in bootstrap_index_chunks(n):
        picked = centred[idx]
        s1[done:done + idx.shape[0]] = picked.sum(axis=1)
        s2[done:done + idx.shape[0]] = (picked * picked).sum(axis=1)
        done += idx.shape[0]
    ci_low, ci_high = (float(x) for x in np.quantile(mean_d + s1 / n, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2]))
    details: dict[str, Any] = {
        "ci_method": f"paired percentile bootstrap of the mean delta, {BOOTSTRAP_RESAMPLES} resamples, "
                     f"seed {BOOTSTRAP_SEED}, {CI_LEVEL:.0%}",
        "df": n - 1,
    }
    if float(np.ptp(d)) <= SAME_DELTA_SPREAD:
        # the t statistic is 0/0 here (or rounding noise over rounding noise); the data leave no doubt
        # about the mean, so the p-value does not either
        return {"test": CONTINUOUS_TEST + DEGENERATE_SUFFIX, "statistic": None,
                "p_value": degenerate_p_value(mean_d, margin),
                "ci_low": ci_low, "ci_high": ci_high, "effect_size": None, "effect_size_name": "cohens_dz",
                "details": details}
    t, p_t, df = DescrStatsW(d).ttest_mean(value=margin, alternative="larger")
    p_boot = float(bootstrap_t_p_value(observed_t(mean_d, float(t), margin), s1, s2, n))
    details.update({
        "df": float(df),
        "p_paired_t": float(p_t),
        "p_bootstrap_t": p_boot,
        "rule": "promote only if both reject: p = max(p_paired_t, p_bootstrap_t)",
        "paired_t_method": "statsmodels DescrStatsW.ttest_mean(value=min_delta, alternative='larger')",
        "bootstrap_t_method": f"one-sided studentized bootstrap: t = (mean - min_delta) / se against "
                              f"T* = (mean* - mean) / se* over {BOOTSTRAP_RESAMPLES} resamples of the rows, "
                              f"seed {BOOTSTRAP_SEED}, p = (1 + #{{T* >= t}}) / (B + 1)",
    })
    return {"test": CONTINUOUS_TEST, "statistic": float(t), "p_value": max(float(p_t), p_boot),
            "ci_low": ci_low, "ci_high": ci_high,
            "effect_size": mean_d / float(np.std(d, ddof=1)), "effect_size_name": "cohens_dz", "details": details}


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
    correction; other scores must pass both the paired t-test of the deltas against the margin and
    a seeded studentized bootstrap of it (see the module docstring).
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
