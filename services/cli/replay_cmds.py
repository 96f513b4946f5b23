"""`tuneline replay gate --policy FILE [--target T]`: past gate decisions under another policy (D13, D16).

Every eval.gate_decided in run_events names its per-row records artifact and the policy it was taken under;
the gate is a pure function of the two. The replay reads each decision's records (sha256-checked), re-runs
the gate (services/evaluator/gate.py) with the recorded policy (to show the decision re-derives) and with the
given one, and prints which decisions flip (services/common/gate_replay.py, shared with the API). Read-only: no version changes; a `gate.replayed` event records
that the replay was asked, by whom, with which policy, and what flipped."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError

from contracts import subjects
from contracts.common import GateSettings
from contracts.envelope import Severity
from contracts.events import GateReplayed, ReplayedDecision
from services.cli.db import read_db
from services.cli.errors import refused, validation_lines
from services.common.commands import envelope_of
from services.common.gate_replay import (Replayed, past_decisions, read_records, replay_all,  # noqa: F401 - the CLI's names
                                         replay_one)


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

    rp = sub.add_parser("replay", help="replay event streams: rebuild projections and the store, re-drive a "
                                      "consumer or a run, re-run past gate decisions under another policy")
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
    from services.cli import replay_verbs

    replay_verbs.add_parsers(rsub, main)
