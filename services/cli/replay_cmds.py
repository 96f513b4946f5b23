"""`tuneline replay gate --policy FILE [--target T]`: past gate decisions under another policy (D13, D16).

Every eval.gate_decided in run_events names its per-row records artifact and the policy it was taken under;
the gate is a pure function of the two. The replay reads each decision's records (sha256-checked), re-runs
the gate (services/evaluator/gate.py) with the recorded policy (to show the decision re-derives) and with the
given one, and prints which decisions flip. Read-only: no version changes; a `gate.replayed` event records
that the replay was asked, by whom, with which policy, and what flipped."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from contracts import subjects
from contracts.common import GateSettings
from contracts.envelope import Severity
from contracts.events import GateReplayed, ReplayedDecision
from services.cli.db import read_db
from services.cli.errors import refused, validation_lines
from services.common.commands import envelope_of


EVALUATION_KEYS = {"judge", "gate", "prompt_baseline", "local_usd_per_hour"}


class PolicyInvalid(ValueError):
    """The policy file cannot be a gate policy: one line naming the problem (audit.replay_policy_invalid)."""


def load_policy(path: str) -> tuple[GateSettings, Any]:
    """(the file as the plan's GateSettings, the gate's GatePolicy) from a YAML or JSON file holding the gate
    keys (min_delta, alpha, max_bucket_drop, max_regressed_share, bucket_fields, safety_buckets), at the top
    or under `gate:` as in an evaluation file. Raises PolicyInvalid."""
    from pathlib import Path

    import yaml

    from services.evaluator.gate import GatePolicy

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyInvalid(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise PolicyInvalid(f"{path} does not parse as YAML or JSON: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("gate"), dict) and set(data) <= EVALUATION_KEYS:
        data = data["gate"]  # an evaluation file: its gate section
    if not isinstance(data, dict):
        raise PolicyInvalid(f"{path} must hold a mapping of gate keys (min_delta, alpha, max_bucket_drop, "
                            f"max_regressed_share, bucket_fields, safety_buckets), not {type(data).__name__}")
    try:
        settings = GateSettings.model_validate(data)
    except ValidationError as exc:
        raise PolicyInvalid(f"{path}: " + "; ".join(line.split(": ", 1)[1]
                                                   for line in validation_lines(exc, "x", whole="policy"))) from None
    try:
        policy = GatePolicy(min_delta=settings.min_delta, alpha=settings.alpha, max_bucket_drop=settings.max_bucket_drop,
                            max_regressed_share=settings.max_regressed_share,
                            safety_buckets=tuple(settings.safety_buckets))
    except ValueError as exc:
        raise PolicyInvalid(f"{path}: {exc}") from None
    return settings, policy


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
    out.delta, out.p_value = now.delta, now.p_value
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


def replay_event(settings: GateSettings, policy, target: str | None, actor: str, results: list[Replayed]) -> GateReplayed:
    return GateReplayed(
        policy={**policy.as_dict(), "bucket_fields": list(settings.bucket_fields)}, policy_sha256=policy.sha256(),
        target=target, requested_by=actor, decisions=len(results),
        replayed=sum(r.now_passed is not None for r in results),
        unreplayable=sum(r.unreplayable is not None for r in results),
        flipped=[ReplayedDecision(gate_event_id=r.gate_event_id, run_id=r.run_id, target=r.target,
                                  was_passed=r.was_passed, now_passed=r.now_passed, now_failed=r.now_failed)
                 for r in results if r.flipped])


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def replay_text(results: list[Replayed], policy_path: str) -> str:
    if not results:
        return "no gate decision recorded"
    lines = [f"{len(results)} past gate decision(s) replayed under {policy_path}:"]
    for r in results:
        was = "passed" if r.was_passed else "failed"
        if r.unreplayable:
            lines.append(f"  {r.run_id} ({r.target}): was {was}; not replayable [{r.unreplayable}]")
            continue
        now = "passed" if r.now_passed else "failed"
        mark = "FLIPS" if r.flipped else "same "
        why = f" ({', '.join(r.now_failed)})" if r.now_failed else ""
        check = "" if r.rederived in (None, True) else "  [the recorded policy does NOT re-derive the recorded decision]"
        lines.append(f"  {mark} {r.run_id} ({r.target}): was {was}, now {now}{why}; delta {_f(r.delta)} p {_f(r.p_value)}"
                     f"{check}")
    flipped = sum(r.flipped for r in results)
    lines.append(f"{flipped} decision(s) flip; {sum(r.unreplayable is not None for r in results)} not replayable; "
                 "nothing was changed (read-only)")
    return "\n".join(lines)


async def publish_replayed(main, event, *, severity: Severity = Severity.INFO, reason_code: str | None = None) -> str:
    """Record that a replay was asked (gate.replayed, projection.replayed): the CLI is its producer, with its
    own run id like a registry command's."""
    from services.common.bus import publish
    from services.common.ids import new_run_id

    env = envelope_of(event, f"replay-{new_run_id()}", "cli", severity=severity, reason_code=reason_code)
    nc, js = await main._js(main.urls()[0])
    try:
        await publish(js, env, subjects.subject_for(env.type, kind="event"))
    finally:
        await nc.close()
    return str(env.event_id)


def cmd_replay_gate(main, args) -> int:
    prefix = "tuneline replay gate"
    try:
        settings, policy = load_policy(args.policy)
    except PolicyInvalid as exc:
        return refused(prefix, "audit.replay_policy_invalid", exc)
    if args.target is not None and not subjects.is_subject_token(args.target):
        return refused(prefix, "registry.invalid_target",
                       f"target {args.target!r} is not a valid name ([A-Za-z0-9_-]+)")
    found = read_db(main, lambda conn: past_decisions(conn, args.target))
    if not found:
        return refused(prefix, "audit.history_target_not_found",
                       "no gate decision recorded" + (f" for target {args.target}" if args.target else ""))
    results = replay_all(found, policy, list(settings.bucket_fields))
    event = replay_event(settings, policy, args.target, args.actor, results)
    event_id = asyncio.run(publish_replayed(main, event))
    if args.json:
        print(json.dumps({"gate_replayed_event_id": event_id, "policy": event.policy,
                          "results": [r.__dict__ | {"flipped": r.flipped} for r in results]}, indent=2, default=str))
    else:
        print(replay_text(results, args.policy))
        print(f"recorded as gate.replayed {event_id}")
    return 0


def add_parser(sub, main) -> None:
    from services.cli.registry_cmds import default_actor

    rp = sub.add_parser("replay", help="re-run past decisions under another policy, read-only")
    rsub = rp.add_subparsers(dest="replay_command", required=True)
    g = rsub.add_parser("gate", help="which past gate decisions a policy file would flip")
    g.add_argument("--policy", required=True, metavar="FILE", help="YAML or JSON: min_delta, alpha, max_bucket_drop, "
                                                                   "max_regressed_share, bucket_fields, safety_buckets")
    g.add_argument("--target", default=None, help="only this target's decisions (default: every target)")
    g.add_argument("--actor", default=default_actor(), help="who asks (recorded in gate.replayed)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=lambda a: cmd_replay_gate(main, a))
    from services.cli import replay_projection_cmds

    replay_projection_cmds.add_parser(rsub, main)
