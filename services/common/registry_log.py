"""A target's registry log as recorded in run_events, and what served the target at a time (D7, D17):
folded from the log up to that time, never read from the `serving` bucket. Read by the CLI and the API."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from contracts import subjects
from contracts.registry import upcast
from services.common.registry_state import TargetState, fold, serving_entry


class TargetNotFound(LookupError):
    pass


class InvalidTime(ValueError):
    pass


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


async def target_state(conn, target: str, at: datetime | None = None) -> tuple[TargetState, list[tuple[int, dict]]]:
    """The target's state folded from run_events (up to `at`), and the events folded."""
    events = await target_log(conn, target)
    if not events:
        raise TargetNotFound(f"target {target} has no registry events")
    if at is not None:
        events = [(seq, e) for seq, e in events if e["occurred_at"] <= at]
    return fold(target, events), events


async def serving_at(conn, target: str, at: datetime | None = None, now: datetime | None = None) -> dict:
    """What served `target` at `at` (default now) and the gate evidence behind it. Raises TargetNotFound
    for a target with no events, InvalidTime for a time outside its log."""
    now = now or datetime.now(UTC)
    at = at or now
    if at > now:
        raise InvalidTime(f"{at.isoformat()} is in the future (now {now.isoformat()})")
    events = await target_log(conn, target)
    if not events:
        raise TargetNotFound(f"target {target} has no registry events")
    first = events[0][1]["occurred_at"]
    if at < first:
        raise InvalidTime(f"{at.isoformat()}: target {target} did not exist yet (its first event is at "
                          f"{first.isoformat()})")
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
    """An ISO 8601 time (UTC unless it says); None for empty or "now". Raises InvalidTime."""
    if text in (None, "", "now"):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidTime(f"{text!r} is not a time (ISO 8601, e.g. 2026-05-01T12:00:00Z)") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)
