"""What the API reads (D18): the timeline projection's tables and run_events, as tuneline_app. SQL only;
the routers shape the answers."""

from __future__ import annotations

import json
from datetime import datetime

RUN_STATUSES = ("running", "paused", "succeeded", "failed")
STAGES = ("ingest", "prep", "trainer", "evaluator", "export", "registry")
SEVERITIES = ("info", "warning", "error", "critical")
CURVE_TYPES = ("training.progress", "training.checkpointed")


async def release_reset(conn) -> None:
    """What the API's pool does with a connection given back. The API's connections keep no session state
    (no LISTEN, advisory lock, cursor or SET), so asyncpg's default reset (one more round trip per release,
    as many as the reads themselves: bench/api.py --profile) is skipped; a transaction left open is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _row(r) -> dict:
    return dict(r)


def _event(r) -> dict:
    d = dict(r)
    d["event_id"] = str(d["event_id"])
    if d.get("causation_id") is not None:
        d["causation_id"] = str(d["causation_id"])
    d["payload"] = json.loads(d["payload"])
    return d


async def list_runs(conn, *, target=None, status=None, stage=None, since=None, until=None, reason_code=None,
                    limit=50, offset=0) -> list[dict]:
    rows = await conn.fetch(
        """SELECT r.* FROM timeline_runs r
           WHERE ($1::text IS NULL OR r.target = $1) AND ($2::text IS NULL OR r.status = $2)
             AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM timeline_stages s WHERE s.run_id = r.run_id AND s.stage = $3))
             AND ($4::timestamptz IS NULL OR r.started_at >= $4) AND ($5::timestamptz IS NULL OR r.started_at < $5)
             AND ($6::text IS NULL OR r.reason_code = $6
                  OR EXISTS (SELECT 1 FROM timeline_entries e WHERE e.run_id = r.run_id AND e.reason_code = $6))
           ORDER BY r.started_at DESC, r.run_id LIMIT $7 OFFSET $8""",
        target, status, stage, since, until, reason_code, limit, offset)
    runs = [_row(r) for r in rows]
    if runs:
        stages = await conn.fetch("SELECT run_id, stage, status FROM timeline_stages WHERE run_id = ANY($1::text[]) "
                                  "ORDER BY started_at, stage", [r["run_id"] for r in runs])
        by_run: dict[str, dict] = {}
        for s in stages:
            by_run.setdefault(s["run_id"], {})[s["stage"]] = s["status"]
        for r in runs:
            r["stages"] = by_run.get(r["run_id"], {})
    return runs


async def run_timeline(conn, run_id: str) -> dict | None:
    run = await conn.fetchrow("SELECT * FROM timeline_runs WHERE run_id = $1", run_id)
    if run is None:
        return None
    stages = await conn.fetch("SELECT * FROM timeline_stages WHERE run_id = $1 ORDER BY started_at, stage", run_id)
    entries = await conn.fetch("SELECT * FROM timeline_entries WHERE run_id = $1 ORDER BY global_position", run_id)
    out = {"run": _row(run), "stages": [_row(s) for s in stages], "entries": [_row(e) for e in entries]}
    for e in out["entries"]:
        e["event_id"] = str(e["event_id"])
    return out


async def run_exists(conn, run_id: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM run_events WHERE run_id = $1)", run_id))


async def events(conn, *, run_id=None, after=0, limit=100, type=None, severity=None, reason_code=None) -> list[dict]:
    """run_events in position order after `after` (the page's cursor)."""
    rows = await conn.fetch(
        """SELECT global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, occurred_at,
                  recorded_at, producer, severity, reason_code, subject, payload
           FROM run_events
           WHERE global_position > $1 AND ($2::text IS NULL OR run_id = $2) AND ($3::text IS NULL OR type = $3)
             AND ($4::text IS NULL OR severity = $4) AND ($5::text IS NULL OR reason_code = $5)
           ORDER BY global_position LIMIT $6""",
        after, run_id, type, severity, reason_code, limit)
    return [_event(r) for r in rows]


async def run_events(conn, run_id: str, types: tuple[str, ...] | None = None) -> list[dict]:
    rows = await conn.fetch(
        "SELECT * FROM run_events WHERE run_id = $1 AND ($2::text[] IS NULL OR type = ANY($2::text[])) "
        "ORDER BY global_position", run_id, list(types) if types else None)
    return [_event(r) for r in rows]


def curve(events: list[dict]) -> dict:
    """The training curve: loss per step (training.progress) and the mid-training evaluations
    (training.checkpointed: eval loss and the selection metric)."""
    loss, evals, max_steps = [], [], None
    for e in events:
        p = e["payload"]
        max_steps = p.get("max_steps") or max_steps
        if e["type"] == "training.progress" and p.get("loss") is not None:
            loss.append({"step": p["step"], "loss": p["loss"]})
        elif e["type"] == "training.checkpointed":
            evals.append({"step": p["step"], "eval_loss": p.get("eval_loss"), "metric": p.get("metric"),
                          "metric_name": p.get("metric_name"), "is_best": p.get("is_best", False)})
    return {"max_steps": max_steps, "loss": loss, "eval": evals}


async def targets(conn) -> list[str]:
    """Every target a run named or the registry has a log for."""
    rows = await conn.fetch(
        """SELECT target FROM timeline_runs WHERE target IS NOT NULL
           UNION SELECT split_part(subject, '.', 4) FROM run_events WHERE subject LIKE 'tuneline.evt.registry.%'
           ORDER BY 1""")
    return [r[0] for r in rows if r[0]]


async def target_known(conn, target: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM timeline_runs WHERE target = $1) OR EXISTS "
        "(SELECT 1 FROM run_events WHERE subject LIKE 'tuneline.evt.registry.' || $2 || '.%')",
        target, target.replace("_", "\\_")))


async def failure_clusters(conn, *, since=None, until=None, target=None, examples=5) -> list[dict]:
    """Failures and warnings grouped by stage and reason code: counts, first and last seen, example runs."""
    rows = await conn.fetch(
        """SELECT e.stage, e.reason_code, count(*) AS events, count(DISTINCT e.run_id) AS runs,
                  min(e.occurred_at) AS first_seen, max(e.occurred_at) AS last_seen,
                  (array_agg(DISTINCT e.run_id))[1:$4] AS example_runs,
                  max(e.severity) AS severity,
                  (array_agg(e.summary ORDER BY e.global_position DESC))[1] AS last_summary
           FROM timeline_entries e LEFT JOIN timeline_runs r ON r.run_id = e.run_id
           WHERE e.reason_code IS NOT NULL
             AND ($1::timestamptz IS NULL OR e.occurred_at >= $1) AND ($2::timestamptz IS NULL OR e.occurred_at < $2)
             AND ($3::text IS NULL OR r.target = $3)
           GROUP BY e.stage, e.reason_code ORDER BY count(*) DESC, e.stage, e.reason_code""",
        since, until, target, examples)
    return [_row(r) for r in rows]


def iso(d: datetime | None) -> str | None:
    return d.isoformat() if d else None
