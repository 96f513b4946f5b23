"""A run's evaluation report, read from its recorded events (eval.completed, eval.gate_decided,
judge.validated, eval.failed): as a dict, as text for a person, and the decision in one sentence.
Used by `tuneline eval show`, the end of `tuneline run` and the API."""

from __future__ import annotations

REPORT_TYPES = ("eval.completed", "eval.gate_decided", "judge.validated", "eval.failed")


def report_of(events: list[dict]) -> dict | None:
    """The run's last evaluation (completed, gate, judge validation, or its failure), or None."""
    out: dict = {}
    for e in events:
        if e["type"] in REPORT_TYPES:
            # a failure's reason code is on the envelope
            out[e["type"]] = {"reason_code": e.get("reason_code")} | e["payload"] | {"_event_id": str(e["event_id"])}
    return out or None


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(report: dict) -> str:
    lines: list[str] = []
    failed = report.get("eval.failed")
    done = report.get("eval.completed")
    if failed and not done:
        return f"evaluation failed: {failed.get('reason_code') or ''} {failed.get('message', '')}".strip() + "\n"
    gate = report.get("eval.gate_decided") or {}
    judge = report.get("judge.validated") or {}
    if done:
        cand, base = done.get("candidate_report") or {}, done.get("baseline_report") or {}
        lines.append(f"candidate vs {done.get('baseline_kind')} baseline {base.get('model', '')} "
                     f"on {cand.get('n', done['candidate']['n'])} test rows (test set {str(done.get('test_set_sha256'))[:12]})")
        lines.append("")
        lines.append(f"{'':<22}{'candidate':>12}{'baseline':>12}")
        for name, key in (("judge mean", "judge_mean"),):
            lines.append(f"{name:<22}{_f(cand.get(key)):>12}{_f(base.get(key)):>12}")
        for name in ("accuracy", "macro_f1", "micro_f1"):
            c, b = (cand.get("metrics") or {}).get(name), (base.get("metrics") or {}).get(name)
            if c is not None or b is not None:
                lines.append(f"{name:<22}{_f(c):>12}{_f(b):>12}")
        lines.append(f"{'latency p50 / p95 ms':<22}{_f(cand.get('latency_ms_p50'), 2) + ' / ' + _f(cand.get('latency_ms_p95'), 2):>12}"
                     f"{_f(base.get('latency_ms_p50'), 2) + ' / ' + _f(base.get('latency_ms_p95'), 2):>12}")
        lines.append(f"{'usd per 1,000':<22}{_f(cand.get('usd_per_1k'), 4):>12}{_f(base.get('usd_per_1k'), 4):>12}")
        per_c = (cand.get("metrics") or {}).get("per_class") or {}
        per_b = (base.get("metrics") or {}).get("per_class") or {}
        if per_c:
            lines += ["", f"{'class':<22}{'support':>8}{'P':>7}{'R':>7}{'F1':>7}{'base F1':>9}"]
            for label, m in per_c.items():
                lines.append(f"{label[:21]:<22}{m['support']:>8}{m['precision']:>7.3f}{m['recall']:>7.3f}{m['f1']:>7.3f}"
                             f"{_f((per_b.get(label) or {}).get('f1')):>9}")
        for w in done.get("warnings") or []:
            lines.append(f"warning {w['reason_code']}: {w['message']}")
    if judge:
        lines += ["", f"judge {judge['judge']['judge_id']}: agreement {judge['accuracy']:.3f} (kappa {judge['cohen_kappa']:.3f}) "
                      f"on {judge['n_gold']} gold and {judge['n_wrong']} wrong answers: "
                      f"{'validated' if judge['passed'] else 'NOT validated'}"]
    if gate:
        ev = gate.get("evidence") or {}
        lines += ["", f"gate ({ev.get('policy_version', '')}, {ev.get('test', '')}): n={ev.get('n')} "
                      f"candidate {_f(ev.get('candidate_mean'))} baseline {_f(ev.get('baseline_mean'))} "
                      f"delta {_f(ev.get('delta'))} [{_f(ev.get('ci_low'))}, {_f(ev.get('ci_high'))}] p={_f(ev.get('p_value'), 4)}"]
        buckets = ev.get("buckets") or {}
        if buckets:
            lines.append(f"{'bucket':<28}{'n':>6}{'cand':>8}{'base':>8}{'delta':>8}")
            for name, b in sorted(buckets.items(), key=lambda kv: kv[1].get("delta", 0)):
                lines.append(f"{name[:27]:<28}{b['n']:>6}{b['candidate_mean']:>8.3f}{b['baseline_mean']:>8.3f}{b['delta']:>+8.3f}")
        regressed = ev.get("regressed_rows") or []
        lines.append(f"regressed rows: {_f(ev.get('regressed_share'))} of rows"
                     + (f"; first: {', '.join(regressed[:20])}" if regressed else ""))
        verdict = "PASSED: the candidate may be promoted" if gate["passed"] else "FAILED: the candidate stays a candidate"
        lines.append(f"decision: {verdict}")
        for f in gate.get("failed") or []:
            lines.append(f"  {f['reason_code']}: {f['message']}")
    return "\n".join(lines) + "\n"


def decision_in_words(report: dict) -> str:
    """One sentence for the end of a run's output."""
    gate = report.get("eval.gate_decided")
    if not gate:
        return ""
    ev = gate.get("evidence") or {}
    verdict = "passed" if gate["passed"] else "failed"
    why = "" if gate["passed"] else ": " + "; ".join(f["reason_code"] for f in gate.get("failed") or [])
    return (f"gate {verdict}{why} (candidate {_f(ev.get('candidate_mean'))} vs {gate['baseline']} "
            f"{_f(ev.get('baseline_mean'))}, delta {_f(ev.get('delta'))}, p={_f(ev.get('p_value'), 4)}, n={ev.get('n')})")
