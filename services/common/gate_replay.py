"""Counterfactual gate replay (D13, D16): a past eval.gate_decided re-run over its recorded per-row records
under another policy. Every decision names its records artifact and the policy it was taken under, and the
gate (services/evaluator/gate.py) is a pure function of the two, so the replay re-derives the recorded
decision (a check) and derives the one the other policy would have taken. Read-only. Shared by the CLI
(`tuneline replay gate`, every past decision under a policy file) and the API (one version's decision under
another margin / alpha, on its page)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Replayed:
    gate_event_id: str
    run_id: str
    target: str
    was_passed: bool
    rederived: bool | None = None          # the recorded policy gives the recorded decision again
    now_passed: bool | None = None
    now_failed: list[str] = field(default_factory=list)
    unreplayable: str | None = None        # "reason_code: why"
    delta: float | None = None
    p_value: float | None = None
    n: int | None = None
    now_messages: list[str] = field(default_factory=list)  # the failed criteria in words

    @property
    def flipped(self) -> bool:
        return self.now_passed is not None and self.now_passed != self.was_passed


def _policy_of(evidence_policy: dict):
    from services.evaluator.gate import GatePolicy

    return GatePolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in evidence_policy.items()})


def replay_one(gate: dict, records: list[dict], policy, bucket_fields: list[str], *, gate_event_id: str,
               run_id: str) -> Replayed:
    """One past decision (`gate`: the eval.gate_decided payload) over its per-row records, under `policy`
    bucketing by the class and `bucket_fields`. Pure."""
    from services.evaluator.gate import decide

    out = Replayed(gate_event_id, run_id, gate["target"], bool(gate["passed"]))
    cand = [r for r in records if r.get("model") == gate["candidate"]]
    base = {r["row_id"]: r for r in records if r.get("model") == gate["baseline"]}
    if not cand or any(r["row_id"] not in base for r in cand):
        out.unreplayable = "audit.replay_records_unreadable: the records do not pair the candidate with its baseline row by row"
        return out
    recorded_fields = {k for r in cand for k in (r.get("buckets") or {})}
    missing = [f for f in bucket_fields if f not in recorded_fields]
    if missing:
        out.unreplayable = (f"audit.replay_bucket_field_unrecorded: the records carry no {', '.join(missing)} bucket "
                            f"(they have {', '.join(sorted(recorded_fields)) or 'none'})")
        return out
    keep = {"class", *bucket_fields}
    scores = ([r["judge_score"] for r in cand], [base[r["row_id"]]["judge_score"] for r in cand],
              [r["row_id"] for r in cand])
    # the judge's own validation is no part of the gate policy: a judge that failed it fails any policy
    judge_failed = [f["reason_code"] for f in gate.get("failed") or [] if f["reason_code"] == "eval.judge_unvalidated"]
    recorded_policy = (gate.get("evidence") or {}).get("policy")
    if recorded_policy:
        again = decide(*scores, [r.get("buckets") or {} for r in cand], _policy_of(recorded_policy))
        out.rederived = (again.passed and not judge_failed) == out.was_passed
    now = decide(*scores, [{k: v for k, v in (r.get("buckets") or {}).items() if k in keep} for r in cand], policy)
    out.now_passed = now.passed and not judge_failed
    out.now_failed = judge_failed + list(now.reason_codes)
    out.now_messages = [f["message"] for f in gate.get("failed") or [] if f["reason_code"] == "eval.judge_unvalidated"] \
        + [f.message for f in now.failed]
    out.delta, out.p_value, out.n = now.delta, now.p_value, now.n
    return out


async def past_decisions(conn, target: str | None) -> list[dict]:
    """Every eval.gate_decided in run_events (of `target`, if given), oldest first."""
    rows = await conn.fetch(
        "SELECT event_id, run_id, occurred_at, payload FROM run_events WHERE type = 'eval.gate_decided' "
        "AND ($1::text IS NULL OR payload->>'target' = $1) ORDER BY global_position", target)
    return [{"event_id": str(r["event_id"]), "run_id": r["run_id"], "occurred_at": r["occurred_at"],
             "payload": json.loads(r["payload"])} for r in rows]


def read_records(ref: dict) -> list[dict]:
    """The records artifact, sha256-checked (raises ArtifactIntegrityError, OSError)."""
    from contracts.common import ArtifactRef
    from services.common.run_artifacts import store_of
    from services.common.jsonl import loads_jsonl

    r = ArtifactRef.model_validate(ref)
    return loads_jsonl(store_of(r).read_bytes(r))


def replay_all(decisions: list[dict], policy, bucket_fields: list[str], read=read_records) -> list[Replayed]:
    from services.common.artifacts import ArtifactIntegrityError

    out = []
    for d in decisions:
        gate = d["payload"]
        try:
            records = read(gate["records"])
        except (ArtifactIntegrityError, OSError, ValueError, KeyError) as exc:
            out.append(Replayed(d["event_id"], d["run_id"], gate.get("target", "?"), bool(gate.get("passed")),
                                unreplayable=f"audit.replay_records_unreadable: {exc}"[:300]))
            continue
        out.append(replay_one(gate, records, policy, bucket_fields, gate_event_id=d["event_id"], run_id=d["run_id"]))
    return out


async def version_decision(conn, gate_event_id: str) -> dict | None:
    """One recorded eval.gate_decided (by event id), shaped as past_decisions' items, or None."""
    r = await conn.fetchrow("SELECT event_id, run_id, occurred_at, payload FROM run_events "
                            "WHERE event_id = $1::uuid AND type = 'eval.gate_decided'", gate_event_id)
    return None if r is None else {"event_id": str(r["event_id"]), "run_id": r["run_id"], "occurred_at": r["occurred_at"],
                                   "payload": json.loads(r["payload"])}


POLICY_KEYS = ("min_delta", "alpha", "max_bucket_drop", "max_regressed_share")


def recorded_policy(gate: dict) -> dict[str, Any]:
    """The policy the decision was taken under (its evidence), the gate's defaults where it recorded none."""
    from services.evaluator.gate import GatePolicy

    return {**GatePolicy().as_dict(), **((gate.get("evidence") or {}).get("policy") or {})}


def counterfactual_policy(gate: dict, **changes: float | None):
    """The recorded policy with `changes` (min_delta, alpha, max_bucket_drop, max_regressed_share; None keeps
    the recorded value). Raises ValueError naming the setting out of range."""
    unknown = set(changes) - set(POLICY_KEYS)
    if unknown:
        raise ValueError(f"not a gate setting: {', '.join(sorted(unknown))}")
    base = recorded_policy(gate)
    return _policy_of({**base, **{k: v for k, v in changes.items() if v is not None}})


def replay_decision(decision: dict, policy, read=read_records) -> Replayed:
    """One recorded decision under `policy`, bucketed as it was recorded (the class and the fields its
    records carry). An unreadable records artifact is an unreplayable result, not an exception."""
    from services.common.artifacts import ArtifactIntegrityError

    gate = decision["payload"]
    try:
        records = read(gate["records"])
    except (ArtifactIntegrityError, OSError, ValueError, KeyError) as exc:
        return Replayed(decision["event_id"], decision["run_id"], gate.get("target", "?"), bool(gate.get("passed")),
                        unreplayable=f"audit.replay_records_unreadable: {exc}"[:300])
    fields = sorted({k for r in records for k in (r.get("buckets") or {})} - {"class"})
    return replay_one(gate, records, policy, fields, gate_event_id=decision["event_id"], run_id=decision["run_id"])


def in_words(r: Replayed, policy, baseline: str | None = None) -> str:
    """The counterfactual decision as a sentence: "under margin 0.10 and alpha 0.01 the candidate beats
    production:v1 by 0.070, p = 0.003, n = 412: would NOT be promotable (eval.gate_margin_not_met: ...);
    it was promotable"."""
    was = "promotable" if r.was_passed else "not promotable"
    under = f"under margin {policy.min_delta:g} and alpha {policy.alpha:g}"
    if r.unreplayable:
        return f"{under}: cannot be replayed ({r.unreplayable}); the recorded decision was: {was}"
    versus = baseline or "its baseline"
    numbers = ", ".join(x for x in (None if r.p_value is None else f"p = {r.p_value:.3g}",
                                    None if r.n is None else f"n = {r.n}") if x)
    change = ("" if r.delta is None else f"beats {versus} by {r.delta:.3f}" if r.delta > 0
              else f"trails {versus} by {-r.delta:.3f}")
    now = "promotable" if r.now_passed else "not promotable"
    why = "" if r.now_passed else " (" + "; ".join(
        f"{c}: {m}" for c, m in zip(r.now_failed, r.now_messages, strict=False)) + ")"
    verdict = (f"would {'become' if r.now_passed else 'NOT be'} promotable{why}; it was {was}" if r.flipped
               else f"{now}{why}, as recorded")
    check = "" if r.rederived in (None, True) else " [the recorded policy does NOT re-derive the recorded decision]"
    return f"{under} the candidate {change}, {numbers}: {verdict}{check}"
