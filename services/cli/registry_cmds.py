"""`tuneline promote|reject|rollback|restore|flag|serving`: the registry's verbs (D7, D17).

The acting verbs publish a registry command that expects the target's log where the CLI read it, wait
for the registry's answer on the bus (the event the command caused, or registry.command_refused), and
print the target's state: exit 0; a refusal is one line with its reason code, exit 2. `serving` answers
what served a target at a time by folding the target's events in run_events up to that time, never from
the `serving` bucket (mutable state)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from datetime import datetime

from pydantic import ValidationError

from contracts.commands import PromoteVersion, RejectVersion, RestoreVersion, RollBackTarget, SetRollout
from contracts.errors import ReasonCodedError
from services.cli.db import read_db
from services.cli.errors import refused, validation_lines
from services.common import registry_log
from services.common.commands import envelope_of, publish_and_wait
from services.common.ids import new_run_id


class Refused(ReasonCodedError):
    """A registry command the CLI refuses before sending it."""


def default_actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (a container): still someone
        return "cli"


# --- acting on a target ------------------------------------------------------------------------


async def send(js, cmd, timeout: float = 120.0) -> tuple[dict, object]:
    """Publish `cmd` expecting the target's current last sequence; returns (the answering envelope as a
    dict, the target's state after it). Raises Refused for registry.command_refused."""
    from services.registry.log import read_target

    before = await read_target(js, cmd.target)
    if cmd.expected_sequence is None:
        cmd = cmd.model_copy(update={"expected_sequence": before.last_sequence})
    got = await publish_and_wait(js, envelope_of(cmd, f"registry-{new_run_id()}", "cli"), timeout)
    if got is None:
        raise TimeoutError(f"no answer from the registry within {timeout:.0f}s; is it up? (`tuneline status`)")
    if got["type"] == "registry.command_refused" or got.get("reason_code"):  # or registry.failed, a dead letter
        raise Refused(got.get("reason_code") or "registry.invalid_transition",
                      (got.get("payload") or {}).get("message") or got["type"])
    return got, await read_target(js, cmd.target)


def state_text(state) -> str:
    """A target's versions and what serves it, for the terminal."""
    prod = state.production
    lines = [f"target {state.target}  (log sequence {state.last_sequence})"]
    if prod is None:
        lines.append("  production  none")
    else:
        override = "  [override]" if prod.override else ""
        lines.append(f"  production  v{prod.version} since {prod.since:%Y-%m-%d %H:%M:%S}Z by {prod.actor}: "
                     f"{prod.reason}{override}  rollout {state.rollout_percent}%")
    for n, v in sorted(state.versions.items()):
        why = f"  {v.rejection}" if v.status == "rejected" and v.rejection else ""
        gate = "" if v.gate is None else f"  gate {'passed' if v.gate.passed else 'failed'}"
        lines.append(f"  v{n:<4} {v.status:<10} run {v.source_run_id}{gate}{why}")
    return "\n".join(lines)


def _act(main, args, make) -> int:
    try:
        cmd = make()
    except ValidationError as exc:
        for line in validation_lines(exc, f"tuneline {args.command}", {"target": "TARGET", "version": "VERSION",
                                                                         "reason": "--reason", "actor": "--actor",
                                                                         "percent": "--rollout"}):
            print(line, file=sys.stderr)
        return 2

    async def go():
        nc, js = await main._js(main.urls()[0])
        try:
            return await send(js, cmd, args.timeout)
        finally:
            await nc.close()

    try:
        got, state = asyncio.run(go())
    except Refused as exc:
        return refused(f"tuneline {args.command}", exc.reason_code, exc)
    except TimeoutError as exc:
        print(f"tuneline {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"event": got, "state": state.summary(recent=1000)}, indent=2, default=str))
    else:
        print(f"{got['type']}: " + _event_words(got["payload"]))
        print(state_text(state))
    return 0


def _event_words(p: dict) -> str:
    out = f"v{p.get('version')}"
    if p.get("demoted"):
        out += f" (v{p['demoted']} archived)"
    if "percent" in p:
        out += f" rollout {p['previous_percent']}% -> {p['percent']}%"
    smoke = p.get("smoke")
    if smoke:
        out += (f"; smoke {smoke['matched']}/{smoke['rows']} rows reproduced" if not smoke.get("skipped")
                else f"; smoke skipped: {smoke['skipped']}")
    return out + f"; by {p.get('actor')}: {p.get('reason')}"


def cmd_promote(main, args) -> int:
    return _act(main, args, lambda: PromoteVersion(target=args.target, version=args.version, reason=args.reason,
                                                   actor=args.actor, override=args.override))


def cmd_reject(main, args) -> int:
    return _act(main, args, lambda: RejectVersion(target=args.target, version=args.version, reason=args.reason,
                                                  actor=args.actor))


def cmd_rollback(main, args) -> int:
    return _act(main, args, lambda: RollBackTarget(target=args.target, reason=args.reason, actor=args.actor))


def cmd_restore(main, args) -> int:
    return _act(main, args, lambda: RestoreVersion(target=args.target, version=args.version, reason=args.reason,
                                                   actor=args.actor))


def cmd_flag(main, args) -> int:
    return _act(main, args, lambda: SetRollout(target=args.target, percent=args.rollout, actor=args.actor,
                                               **({"reason": args.reason} if args.reason else {})))


# --- what served a target at a time ---------------------------------------------------------------


async def serving_at(conn, target: str, at: datetime | None = None, now: datetime | None = None) -> dict:
    """What served `target` at `at` (default now), folded from run_events up to that time: the serving entry
    and the gate evidence behind it. Raises Refused for a target with no events or a time outside its log."""
    try:
        return await registry_log.serving_at(conn, target, at, now)
    except registry_log.TargetNotFound as exc:
        raise Refused("registry.target_not_found", str(exc)) from None
    except registry_log.InvalidTime as exc:
        raise Refused("registry.invalid_time", f"--at {exc}") from None


def parse_time(text: str | None) -> datetime | None:
    try:
        return registry_log.parse_time(text)
    except registry_log.InvalidTime as exc:
        raise Refused("registry.invalid_time", f"--at {exc}") from None


def serving_text(answer: dict) -> str:
    e = answer["serving"]
    if e is None:
        return f"{answer['target']}: nothing in production at {answer['at']} ({answer['versions']} version(s) registered)"
    pin = e["base_model"] or {}
    lines = [f"{e['target']} at {answer['at']}: v{e['version']} (run {e['source_run_id']}), rollout {e['rollout_percent']}%",
             f"  since {e['since']} by {e['by']}: {e['reason']}" + ("  [override]" if e.get("override") else ""),
             f"  model {e['model_uri'] or e.get('hosted_model')} on {pin.get('model')} "
             f"(weights sha256 {(pin.get('sha256') or 'unpinned')[:16]})"]
    ev = answer.get("evidence")
    if ev:
        def f(x):
            return "?" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
        lines.append(f"  evidence eval.gate_decided {ev['gate_event_id']}: gate {'passed' if ev['passed'] else 'failed'}, "
                     f"delta {f(ev['delta'])}, p {f(ev['p_value'])}, n {f(ev['n'])} vs {ev.get('baseline')}, "
                     f"test set {(ev['test_set_sha256'] or '?')[:16]}")
    elif e.get("gate_event_id"):
        lines.append(f"  evidence eval.gate_decided {e['gate_event_id']} (not in run_events)")
    else:
        lines.append("  evidence none (promoted without a gate decision)")
    lines.append(f"  dataset version {e.get('dataset_version') or 'unknown'}"
                 + (f", sha256 {e['dataset_sha256'][:16]}" if e.get("dataset_sha256") else ""))
    return "\n".join(lines)


def cmd_serving(main, args) -> int:
    try:
        answer = read_db(main, lambda conn: serving_at(conn, args.target, parse_time(args.at)))
    except Refused as exc:
        return refused("tuneline serving", exc.reason_code, exc)
    except ValueError as exc:  # not a target name
        return refused("tuneline serving", "registry.invalid_target", exc)
    print(json.dumps(answer, indent=2, default=str) if args.json else serving_text(answer))
    return 0


def add_parser(sub, main) -> None:
    def common(p, version: bool = True, reason: bool = True):
        p.add_argument("target")
        if version:
            p.add_argument("version", help="a version number, vN, or the run id that produced it")
        p.add_argument("--reason", required=reason, default=None, help="one line, recorded in the event")
        p.add_argument("--actor", default=default_actor(), help="who acts (default: the OS user)")
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("promote", help="make a version production (the current one is archived)")
    common(p)
    p.add_argument("--override", action="store_true", help="promote although the gate failed or it was rejected")
    p.set_defaults(fn=lambda a: cmd_promote(main, a))
    p = sub.add_parser("reject", help="reject a version, with a one-line reason")
    common(p)
    p.set_defaults(fn=lambda a: cmd_reject(main, a))
    p = sub.add_parser("rollback", help="production goes back to the previous production version")
    common(p, version=False)
    p.set_defaults(fn=lambda a: cmd_rollback(main, a))
    p = sub.add_parser("restore", help="an archived version becomes production again")
    common(p)
    p.set_defaults(fn=lambda a: cmd_restore(main, a))
    p = sub.add_parser("flag", help="the staged rollout percentage of the production version")
    common(p, version=False, reason=False)
    p.add_argument("--rollout", type=int, required=True, metavar="N", help="percent of traffic, 0..100")
    p.set_defaults(fn=lambda a: cmd_flag(main, a))
    p = sub.add_parser("serving", help="what served a target (now, or --at a time), from the log")
    p.add_argument("target")
    p.add_argument("--at", default=None, metavar="TIME", help="ISO 8601 time (UTC unless it says); default now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=lambda a: cmd_serving(main, a))
