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
from datetime import UTC, datetime

from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from contracts import subjects
from contracts.commands import PromoteVersion, RejectVersion, RestoreVersion, RollBackTarget, SetRollout
from contracts.envelope import Envelope
from contracts.registry import message_type_of, upcast
from services.cli.errors import validation_lines
from services.common.ids import new_run_id


class Refused(Exception):
    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


def default_actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (a container): still someone
        return "cli"


# --- acting on a target ------------------------------------------------------------------------


async def send(js, cmd, timeout: float = 120.0) -> tuple[dict, object]:
    """Publish `cmd` expecting the target's current last sequence; returns (the answering envelope as a
    dict, the target's state after it). Raises Refused for registry.command_refused."""
    from services.common.bus import publish
    from services.registry.log import read_target

    before = await read_target(js, cmd.target)
    if cmd.expected_sequence is None:
        cmd = cmd.model_copy(update={"expected_sequence": before.last_sequence})
    mt = message_type_of(cmd)
    run_id = f"registry-{new_run_id()}"
    env = Envelope(type=mt.name, schema_version=mt.version, run_id=run_id, correlation_id=run_id, producer="cli",
                   payload=cmd.model_dump(mode="json"))
    answer: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_msg(msg) -> None:
        try:
            got = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(got, dict) and got.get("causation_id") == str(env.event_id) and not answer.done():
            answer.set_result(got)

    # A JetStream consumer of what the stream stores from now on, made before publishing (the answer cannot
    # pass by): not a core subscription, which also hears a losing append that the stream refused (10071).
    sub = await js.subscribe(f"{subjects.EVENTS}.>", cb=on_msg, stream=subjects.STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.NEW)
    try:
        await publish(js, env, subjects.subject_for(env.type, kind="command"))
        try:
            got = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer from the registry within {timeout:.0f}s; is it up? (`tuneline status`)") from None
    finally:
        await sub.unsubscribe()
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
        print(f"tuneline {args.command}: [{exc.reason_code}] {exc}", file=sys.stderr)
        return 2
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


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def target_log(conn, target: str) -> list[tuple[int, dict]]:
    """The target's registry events from run_events, in log order, payloads upcast."""
    prefix = subjects.registry_target_filter(target)[:-1]
    rows = await conn.fetch(
        "SELECT global_position, event_id, type, schema_version, occurred_at, payload FROM run_events "
        "WHERE subject LIKE $1 ESCAPE '\\' ORDER BY global_position", _like_escape(prefix) + "%")
    out = []
    for r in rows:
        payload = json.loads(r["payload"])
        try:
            payload = upcast(r["type"], r["schema_version"], payload)
        except (KeyError, ValueError):
            continue  # a type this build does not know: not part of the aggregate
        out.append((r["global_position"], {"event_id": str(r["event_id"]), "type": r["type"],
                                           "occurred_at": r["occurred_at"], "payload": payload}))
    return out


async def serving_at(conn, target: str, at: datetime | None = None, now: datetime | None = None) -> dict:
    """What served `target` at `at` (default now), folded from run_events up to that time: the serving entry
    and the gate evidence behind it. Raises Refused for a target with no events or a time outside its log."""
    from services.registry.domain import fold, serving_entry

    now = now or datetime.now(UTC)
    at = at or now
    if at > now:
        raise Refused("registry.invalid_time", f"--at {at.isoformat()} is in the future (now {now.isoformat()})")
    events = await target_log(conn, target)
    if not events:
        raise Refused("registry.target_not_found", f"target {target} has no registry events")
    first = events[0][1]["occurred_at"]
    if at < first:
        raise Refused("registry.invalid_time", f"--at {at.isoformat()}: target {target} did not exist yet "
                                               f"(its first event is at {first.isoformat()})")
    state = fold(target, [(seq, e) for seq, e in events if e["occurred_at"] <= at])
    entry = serving_entry(state)
    out = {"target": target, "at": at.isoformat(), "serving": entry, "evidence": None,
           "versions": len(state.versions)}
    if entry and entry.get("gate_event_id"):
        row = await conn.fetchrow("SELECT payload FROM run_events WHERE event_id = $1::uuid", entry["gate_event_id"])
        if row is not None:
            e = json.loads(row["payload"])
            ev = e.get("evidence") or {}
            out["evidence"] = {"gate_event_id": entry["gate_event_id"], "passed": e.get("passed"),
                               "delta": ev.get("delta"), "p_value": ev.get("p_value"), "n": ev.get("n"),
                               "test_set_sha256": e.get("test_set_sha256"), "baseline": e.get("baseline")}
        else:  # the verdict the registration copied (the gate event itself not recorded here)
            g = state.versions[entry["version"]].gate
            if g is not None:
                out["evidence"] = {"gate_event_id": g.event_id, "passed": g.passed, "delta": g.delta,
                                   "p_value": g.p_value, "n": g.n, "test_set_sha256": g.test_set_sha256,
                                   "baseline": g.baseline}
    return out


def parse_time(text: str | None) -> datetime | None:
    if text in (None, "", "now"):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise Refused("registry.invalid_time", f"--at {text!r} is not a time (ISO 8601, e.g. 2026-05-01T12:00:00Z)") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


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
    async def go():
        conn = await main._db(main.urls()[1])
        try:
            return await serving_at(conn, args.target, parse_time(args.at))
        finally:
            await conn.close()

    try:
        answer = asyncio.run(go())
    except Refused as exc:
        print(f"tuneline serving: [{exc.reason_code}] {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # not a target name
        print(f"tuneline serving: [registry.invalid_target] {exc}", file=sys.stderr)
        return 2
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
