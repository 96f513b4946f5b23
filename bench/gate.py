"""Promotion-gate calibration: how often `services.evaluator.gate.decide` promotes a candidate that is
not better than production by the margin (false promotions), and how often it promotes one that is.

    python -m bench.gate [--reps 20000] [--verify 100] [--seed 7]

Paired per-row scores are simulated at true mean delta 0, 0.05 (= min_delta, the edge of H0), 0.10
and 0.15, for n = 50, 200, 1000 rows and both score kinds:
- binary: per-row correctness of two correlated classifiers; production is right on 70% of rows and
  the two disagree on 20% of rows (P(cand right, prod wrong) - P(cand wrong, prod right) = delta).
  Besides the simulated rate, the exact rejection probability is enumerated over every (n10, n01)
  outcome, and its worst case over discordance rates 0.05..0.95 is printed per n.
- continuous: judge scores in [0, 1]: row difficulty s ~ 0.25 + 0.35 Beta(2, 2), production = s + e,
  candidate = s + delta + f with e, f ~ 0.25 (2 Beta(2, 2) - 1) independent (corr(production,
  candidate) = 0.33, sd of the per-row delta 0.16). Nothing is clipped (the
  scores stay in [0, 0.85 + delta]) and e, f are symmetric about 0, so the true mean delta is exactly
  delta.
- stress (continuous, at true delta = min_delta only), five null shapes that are not the friendly
  one above, so the calibration is not tuned to one shape (each keeps the mean delta exactly 0.05):
  left-skewed (+0.09 on 90% of rows, -0.31 on 10%: slightly better on most rows, much worse on a
  few, the skew under which a one-sided t-test runs hot), its mirror right-skewed, symmetric heavy
  tails (0.05 + 0.06 t(3)), bimodal (+0.17 on 70% of rows, -0.23 on 30%) and a 5-point judge scale
  (deltas -0.25/0/+0.25, so they tie).
The policy is gate-v2 with the row criteria off (no buckets, max_regressed_share = 1.0), so the
rate measures the test. The statistical core is run vectorised over the replications (the gate's
bootstrap resamples are fixed by its seed, so each is one matrix product: deltas @ resample counts);
the first --verify replications of every cell are also run through decide() itself and must reach
the same decision with the same p-value (to 1e-9). For continuous scores the table also prints, on
the same draws, the rate of the paired t-test alone (the gate's test before), the bootstrap-t alone
and Johnson's skewness-corrected t; these are for comparison and not in the figure.

Prints a table and writes bench/results/gate.json as {"name", "figure", "unit", "baseline", "ratio",
"rows"}: figure is the worst simulated false-promotion rate over every null cell (true delta 0 and
0.05): binary, continuous and the stress shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.special import gammaln

from services.evaluator.gate import (
    BOOTSTRAP_RESAMPLES,
    SAME_DELTA_SPREAD,
    GatePolicy,
    bootstrap_counts,
    bootstrap_t_p_value,
    decide,
    tango_margin_z,
)

RESULTS = Path(__file__).resolve().parent / "results"
POLICY = GatePolicy(max_regressed_share=1.0)
SIZES = (50, 200, 1000)
DELTAS = (0.0, 0.05, 0.10, 0.15)
BASELINE_ACCURACY = 0.7
DISCORDANCE = 0.2
CHUNK_CELLS = 4_000_000  # rows x replications drawn at once
CHUNK_RESAMPLE_CELLS = 8_000_000  # replications x bootstrap resamples held at once


def _binary_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    p10, p01 = (DISCORDANCE + delta) / 2, (DISCORDANCE - delta) / 2
    p11 = BASELINE_ACCURACY - p01
    u = rng.random((reps, n))
    cand = (u < p10) | ((u >= p10 + p01) & (u < p10 + p01 + p11))
    base = (u >= p10) & (u < p10 + p01 + p11)
    return cand.astype(np.float64), base.astype(np.float64)


def _continuous_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    s = 0.25 + 0.35 * rng.beta(2, 2, (reps, n))
    e = 0.25 * (2 * rng.beta(2, 2, (reps, n)) - 1)
    f = 0.25 * (2 * rng.beta(2, 2, (reps, n)) - 1)
    return s + delta + f, s + e


def _left_skewed_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """A candidate a bit better on 90% of rows and much worse on 10%: deltas delta + 0.04 or
    delta - 0.36 (mean exactly delta), each +- 0.01 uniform."""
    base = 0.35 + 0.5 * rng.beta(2, 2, (reps, n))
    big_loss = rng.random((reps, n)) < 0.1
    d = delta + np.where(big_loss, -0.36, 0.04) + 0.02 * (rng.random((reps, n)) - 0.5)
    return base + d, base


def _right_skewed_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The mirror image: a bit worse on 90% of rows and much better on 10%: deltas delta - 0.04 or
    delta + 0.36 (mean exactly delta), each +- 0.01 uniform."""
    base = 0.15 + 0.4 * rng.beta(2, 2, (reps, n))
    big_win = rng.random((reps, n)) < 0.1
    d = delta + np.where(big_win, 0.36, -0.04) + 0.02 * (rng.random((reps, n)) - 0.5)
    return base + d, base


def _heavy_tailed_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric heavy tails: deltas delta + 0.06 t(3), the t clipped at +-5 (symmetric, so the mean
    stays exactly delta; sd of the delta about 0.09, kurtosis far above the normal's)."""
    base = 0.4 + 0.2 * rng.beta(2, 2, (reps, n))
    d = delta + 0.06 * np.clip(rng.standard_t(3, (reps, n)), -5.0, 5.0)
    return base + d, base


def _bimodal_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of rows: the candidate wins by about 0.12 + delta on 70% of rows and loses by about
    0.28 - delta on 30% (mean exactly delta), each +- 0.05 (symmetric Beta(2, 2) noise)."""
    base = 0.35 + 0.25 * rng.beta(2, 2, (reps, n))
    wins = rng.random((reps, n)) < 0.7
    d = delta + np.where(wins, 0.12, -0.28) + 0.05 * (2 * rng.beta(2, 2, (reps, n)) - 1)
    return base + d, base


def _five_point_rows(rng, reps: int, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """A judge on a 5-point scale (scores 0, 0.25, .., 1), so deltas tie: production scores 0.25,
    0.5 or 0.75; the candidate scores one step lower with probability 0.25 - 2 delta, one step higher
    with 0.25 + 2 delta, else the same (mean exactly delta)."""
    base = 0.25 * rng.integers(1, 4, (reps, n))
    u = rng.random((reps, n))
    up, down = 0.25 + 2 * delta, 0.25 - 2 * delta
    d = np.where(u < up, 0.25, np.where(u < up + down, -0.25, 0.0))
    return base + d, base


DRAWS = {"binary": _binary_rows, "continuous": _continuous_rows, "continuous_left_skewed": _left_skewed_rows,
         "continuous_right_skewed": _right_skewed_rows, "continuous_heavy_tailed": _heavy_tailed_rows,
         "continuous_bimodal": _bimodal_rows, "continuous_five_point": _five_point_rows}
STRESS = {
    "continuous_left_skewed": ("left-skewed", "+0.09 on 90% of rows, -0.31 on 10%"),
    "continuous_right_skewed": ("right-skew", "+0.01 on 90% of rows, +0.41 on 10%"),
    "continuous_heavy_tailed": ("heavy-tail", "0.05 + 0.06 t(3), clipped at +-5 t"),
    "continuous_bimodal": ("bimodal", "+0.17 on 70% of rows, -0.23 on 30%, +-0.05"),
    "continuous_five_point": ("5-point", "5-point judge scale: -0.25/0/+0.25 w.p. 0.15/0.50/0.35"),
}
# the same gate statistic, other tests: printed beside the gate's for comparison (not in the figure)
ALTERNATIVES = ("paired_t", "bootstrap_t", "johnson_t")
_COUNTS: dict[int, np.ndarray] = {}


def _counts(n: int) -> np.ndarray:
    if n not in _COUNTS:
        _COUNTS[n] = bootstrap_counts(n).T.copy()  # (n, B), so that deltas @ counts sums each resample
    return _COUNTS[n]


def _core(kind: str, cand: np.ndarray, base: np.ndarray,
          full: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(p-value, passed) per replication, as decide() computes them, and for continuous scores whether
    each alternative (the t-test alone, the bootstrap-t alone, Johnson's t) would pass. The bootstrap
    (the costly part) runs only for the first `full` replications and those whose mean delta reaches
    the margin: no test can pass the others (mean < margin fails the gate), so their decisions are
    exact, but their continuous p-values are the t-test's alone."""
    n = cand.shape[1]
    d = cand - base
    mean = d.mean(axis=1)
    alternatives: dict[str, np.ndarray] = {}
    if kind == "binary":
        b = ((cand == 1) & (base == 0)).sum(axis=1)
        c = ((cand == 0) & (base == 1)).sum(axis=1)
        z = tango_margin_z(b, c, n, POLICY.min_delta)
        p = np.where(np.isnan(z), np.where(mean > POLICY.min_delta + 1e-12, 0.0, 1.0), stats.norm.sf(z))
    else:
        m = POLICY.min_delta
        centred = d - mean[:, None]
        sd = d.std(axis=1, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (mean - m) / (sd / math.sqrt(n))
        same = np.ptp(d, axis=1) <= SAME_DELTA_SPREAD
        degenerate = np.where(mean > m + 1e-12, 0.0, 1.0)
        p_t = stats.t.sf(t, n - 1)
        counts = _counts(n)
        t_obs = np.where(np.abs(mean - m) <= 1e-12, 0.0, t)
        boot = mean >= m - 1e-12
        boot[:full] = True
        p_boot = np.zeros_like(p_t)
        c = centred[boot]
        p_boot[boot] = bootstrap_t_p_value(t_obs[boot], c @ counts, (c * c) @ counts, n)
        # Johnson (1978): t with the first-order Edgeworth (skewness) correction of its numerator
        mu3 = (centred ** 3).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_j = (mean - m + mu3 / (6 * sd ** 2 * n) + mu3 / (3 * sd ** 4) * (mean - m) ** 2) / (sd / math.sqrt(n))
        p = np.where(same, degenerate, np.maximum(p_t, p_boot))
        alternatives = {"paired_t": np.where(same, degenerate, p_t), "bootstrap_t": np.where(same, degenerate, p_boot),
                        "johnson_t": np.where(same, degenerate, stats.t.sf(t_j, n - 1))}
    regressed_share = (cand < base).mean(axis=1)
    rows_ok = (mean >= POLICY.min_delta - 1e-12) & (regressed_share < POLICY.max_regressed_share)
    passed = (p < POLICY.alpha) & rows_ok
    return p, passed, {name: (q < POLICY.alpha) & rows_ok for name, q in alternatives.items()}


def exact_binary_rate(n: int, delta: float, discordance: float) -> float:
    """P(decide passes) by enumerating every (n10, n01) outcome of the multinomial."""
    b, c = (a.ravel() for a in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
    keep = b + c <= n
    b, c = b[keep], c[keep]
    z = tango_margin_z(b, c, n, POLICY.min_delta)
    reject = (stats.norm.sf(z) < POLICY.alpha) & ((b - c) / n >= POLICY.min_delta)
    b, c = b[reject], c[reject]
    p10, p01 = (discordance + delta) / 2, (discordance - delta) / 2
    log_p = gammaln(n + 1) - gammaln(b + 1) - gammaln(c + 1) - gammaln(n - b - c + 1) + b * math.log(p10) \
        + (n - b - c) * math.log1p(-discordance)
    log_p = log_p + (c * math.log(p01) if p01 > 0 else np.where(c == 0, 0.0, -np.inf))
    return float(np.exp(log_p).sum())


def _verify(kind: str, cand: np.ndarray, base: np.ndarray, p: np.ndarray, passed: np.ndarray) -> float:
    """Runs decide() on these replications; returns the largest p-value difference."""
    n = cand.shape[1]
    ids = [f"row-{i}" for i in range(n)]
    no_buckets = [{}] * n
    worst = 0.0
    for k in range(cand.shape[0]):
        decision = decide(cand[k], base[k], ids, no_buckets, POLICY)
        if decision.score_kind != kind or decision.passed != bool(passed[k]):
            raise AssertionError(f"{kind} n={n} replication {k}: decide() {decision.score_kind} passed={decision.passed}, "
                                 f"vectorised passed={bool(passed[k])} (p {decision.p_value} vs {p[k]})")
        worst = max(worst, abs(decision.p_value - float(p[k])))
    if worst > 1e-9:
        raise AssertionError(f"{kind} n={n}: decide() and the vectorised core differ in p by {worst}")
    return worst


def run_cell(scenario: str, n: int, delta: float, reps: int, verify: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, SIZES.index(n), DELTAS.index(delta), list(DRAWS).index(scenario)])
    draw = DRAWS[scenario]
    kind = "binary" if scenario == "binary" else "continuous"
    chunk = CHUNK_CELLS // n if kind == "binary" else min(CHUNK_CELLS // n, CHUNK_RESAMPLE_CELLS // BOOTSTRAP_RESAMPLES)
    chunk = max(verify, chunk)
    passes, done, worst_dp, verified = 0, 0, 0.0, 0
    alt_passes = {name: 0 for name in ALTERNATIVES} if kind == "continuous" else {}
    while done < reps:
        size = min(chunk, reps - done)
        cand, base = draw(rng, size, n, delta)
        p, passed, alt_passed = _core(kind, cand, base, full=max(0, verify - verified))
        if verified < verify:
            k = min(verify - verified, size)
            worst_dp = max(worst_dp, _verify(kind, cand[:k], base[:k], p[:k], passed[:k]))
            verified += k
        passes += int(passed.sum())
        for name, ok in alt_passed.items():
            alt_passes[name] += int(ok.sum())
        done += size
    rate = passes / reps
    row = {"scenario": scenario, "score_kind": kind, "n": n, "true_delta": delta, "reps": reps, "promoted": passes,
           "rate": rate, "mc_se": math.sqrt(rate * (1 - rate) / reps), "verified_with_decide": verified,
           "max_p_diff_vs_decide": worst_dp, "exact_rate": None,
           "alternative_rates": {name: k / reps for name, k in alt_passes.items()}}
    if kind == "binary":
        row["exact_rate"] = exact_binary_rate(n, delta, DISCORDANCE)
    row["quantity"] = "false-promotion rate" if delta <= POLICY.min_delta else "power"
    return row


def worst_binary_size(n: int) -> tuple[float, float]:
    """The exact rejection probability at true delta = min_delta, maximised over discordance rates."""
    grid = np.round(np.concatenate([np.arange(0.05, 0.2, 0.01), np.arange(0.2, 0.96, 0.05)]), 4)
    rates = [exact_binary_rate(n, POLICY.min_delta, float(dr)) for dr in grid]
    i = int(np.argmax(rates))
    return rates[i], float(grid[i])


def main(reps: int, verify: int, seed: int) -> dict:
    start = time.perf_counter()
    rows = [run_cell(kind, n, delta, reps, verify, seed)
            for kind in ("binary", "continuous") for delta in DELTAS for n in SIZES]
    stress = [run_cell(scenario, n, POLICY.min_delta, reps, verify, seed) for scenario in STRESS for n in SIZES]
    worst_size = {n: worst_binary_size(n) for n in SIZES}
    null_rows = [r for r in rows + stress if r["true_delta"] <= POLICY.min_delta]
    figure = max(r["rate"] for r in null_rows)
    return {"name": "gate_calibration", "figure": figure, "unit": "false-promotion rate", "baseline": POLICY.alpha,
            "ratio": round(figure / POLICY.alpha, 3), "rows": rows + stress,
            "binary_worst_exact_size": {str(n): {"rate": r, "discordance": dr} for n, (r, dr) in worst_size.items()},
            "policy": POLICY.as_dict(), "seed": seed, "elapsed_s": round(time.perf_counter() - start, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()}


def print_table(result: dict) -> None:
    alpha = POLICY.alpha
    print(f"{'scenario':<11} {'n':>5} {'true delta':>10} {'quantity':<21} {'simulated':>9} {'± mc se':>8} "
          f"{'exact':>7}  {'target':<14} {'t-test':>7} {'boot-t':>7} {'johnson':>7}")
    for r in result["rows"]:
        exact = f"{r['exact_rate']:.4f}" if r["exact_rate"] is not None else "-"
        if r["quantity"] == "power":
            verdict = ""
        else:
            # the simulated rate of a test whose size is exactly alpha lands above alpha half the time
            level = r["exact_rate"] if r["exact_rate"] is not None else r["rate"] - 2 * r["mc_se"]
            verdict = f"<= {alpha} {'ok' if level <= alpha else 'MISSED'}"
        alt = r.get("alternative_rates") or {}
        others = " ".join(f"{alt[name]:>7.4f}" if name in alt else f"{'-':>7}" for name in ALTERNATIVES)
        if r["scenario"] in STRESS and r["n"] == SIZES[0]:
            print(f"stress, true delta = margin: {STRESS[r['scenario']][1]} (mean 0.05)")
        scenario = STRESS[r["scenario"]][0] if r["scenario"] in STRESS else r["scenario"]
        print(f"{scenario:<11} {r['n']:>5} {r['true_delta']:>10.2f} {r['quantity']:<21} {r['rate']:>9.4f} "
              f"{r['mc_se']:>8.4f} {exact:>7}  {verdict:<14} {others}")
    worst = ", ".join(f"n={n}: {v['rate']:.4f} (discordance {v['discordance']})"
                      for n, v in result["binary_worst_exact_size"].items())
    print(f"  binary, exact false-promotion rate at true delta = {POLICY.min_delta}, worst over discordance "
          f"0.05..0.95: {worst}")
    print("  continuous: the gate promotes only if the paired t-test AND the bootstrap-t reject; t-test, boot-t, "
          "johnson: the rate of each alone on the same draws (for comparison, not in the figure)")
    print(f"  figure (worst simulated false-promotion rate over every null cell, binary, continuous and stress): "
          f"{result['figure']:.4f}, ratio to alpha {result['ratio']:.3f}; {result['rows'][0]['reps']} replications "
          f"per cell, seed {result['seed']}, {result['elapsed_s']}s on {result['machine']}")
    diffs = max(r["max_p_diff_vs_decide"] for r in result["rows"])
    verified = sum(r["verified_with_decide"] for r in result["rows"])
    print(f"  decide() re-run on {verified} replications: same decisions, p-values within {diffs:.1e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--verify", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    result = main(args.reps, args.verify, args.seed)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gate.json").write_text(json.dumps(
        {k: result[k] for k in ("name", "figure", "unit", "baseline", "ratio", "rows")}, indent=2) + "\n")
    print_table(result)
