"""The History projection: every fine-tune run of a target and what became of it, and the target's numbered datasets.

One row per run whose plan trains (promoted, rejected or abandoned: failed or cancelled) with its start and
end, train rows, held-out accuracy, the judge means of candidate and baseline the gate compared, delta and p,
outcome, rejection reason and who acted; and one row per distinct dataset a target was prepared on, numbered
1.0.0, 1.1.0 (rows added), 1.1.1 (rows corrected or removed), 2.0.0 (label space changed).

Like the timeline (D8) it reads run_events, never the bus, and writes its rows and checkpoint in one
transaction; it stops on an error at the failing position. Each batch loads the rows its events touch, folds
the events into them in order (`fold`, pure) and writes them back, so the rows are the whole state: a rebuild
from position 0, in batches of any size, gives the same rows (`tuneline rebuild history` checks it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from contracts.common import STAGES as PLAN_STAGES
from services.audit import exactjson
from services.audit.projections import checkpoints
from services.audit.projections.checkpoints import ProjectionError
from services.audit.projections.timeline import consumer_stage, fails
from services.common.history import target_history  # noqa: F401 - the tables' reader (CLI and API)

NAME = "history"

_STARTS = ("run.start", "ingest.commit")
_REGISTRATIONS = ("registry.version_registered", "registry.hosted_version_registered")
_STAGE_DONE = {"training.completed": "trainer", "eval.completed": "evaluator", "export.completed": "export"}
_LIFECYCLE = ("registry.validated", "registry.rejected", "registry.promoted", "registry.rolled_back",
              "registry.restored", "registry.rollout_set")
OUTCOME_OF = {"running": "pending", "candidate": "pending", "validated": "pending", "stopped": "unregistered",
              "failed": "abandoned",
              "cancelled": "abandoned", "rejected": "rejected", "production": "promoted", "archived": "promoted"}

RUN_COLUMNS = ("run_id", "target", "status", "outcome", "started_at", "ended_at", "updated_at", "last_position",
               "reason_code", "failure", "locator", "recipe", "train_rows", "validation_rows", "test_rows",
               "dataset_version", "dataset_semver", "manifest_sha256", "test_set_sha256", "accuracy",
               "baseline_accuracy", "candidate_judge_mean", "baseline_judge_mean", "baseline", "delta", "p_value", "n",
               "gate_passed", "gate_failed", "gate_event_id", "export_sha256", "version", "override",
               "rejection_reason", "acts")
DATASET_COLUMNS = ("target", "dataset_version", "semver", "major", "minor", "patch", "label_space", "rows",
                   "manifest_sha256", "first_run_id", "first_position", "prepared_at")


# --- dataset numbering (pure) ---------------------------------------------------------------------


def next_dataset_number(known: list[dict], label_space: list[str], rows: int) -> tuple[int, int, int]:
    """The number of a target's new dataset (its content hash not seen before), against the last one it
    was given (`known`: the target's datasets, any order): 1.0.0 for the first; a major bump when the label
    space differs (models trained on the two are not interchangeable); a minor bump when there are more rows
    (rows added); a patch otherwise (as many rows or fewer: corrections, removals, another split). Rows are
    compared by count, from the events: the projection never reads artifacts."""
    if not known:
        return 1, 0, 0
    last = max(known, key=lambda d: (d["major"], d["minor"], d["patch"]))
    if sorted(last["label_space"]) != sorted(label_space):
        return last["major"] + 1, 0, 0
    if rows > last["rows"]:
        return last["major"], last["minor"] + 1, 0
    return last["major"], last["minor"], last["patch"] + 1


# --- the fold (pure) ------------------------------------------------------------------------------


@dataclass
class HistoryState:
    """The rows a batch touches, loaded before the fold and written after it (`dirty_*`)."""

    runs: dict[str, dict] = field(default_factory=dict)                      # run_id -> row
    versions: dict[tuple[str, int], str] = field(default_factory=dict)       # (target, version) -> run_id
    datasets: dict[str, dict[str, dict]] = field(default_factory=dict)       # target -> dataset_version -> row
    dirty_runs: set[str] = field(default_factory=set)
    dirty_datasets: set[tuple[str, str]] = field(default_factory=set)
    last_position: int = 0


def _trains(plan: dict | None) -> bool:
    """Whether the plan goes as far as training (a run that stops after prep is no fine-tune)."""
    until = (plan or {}).get("until", "registry")
    return until in PLAN_STAGES and PLAN_STAGES.index(until) >= PLAN_STAGES.index("trainer")


def new_run(run_id: str, target: str, at: datetime, pos: int) -> dict:
    row: dict[str, Any] = {c: None for c in RUN_COLUMNS}
    row.update(run_id=run_id, target=target, status="running", outcome="pending", started_at=at, updated_at=at,
               last_position=pos, override=False, acts=[])
    return row


def _set_status(row: dict, status: str) -> None:
    row["status"], row["outcome"] = status, OUTCOME_OF[status]


def _act(row: dict, etype: str, p: dict, at: datetime, pos: int, **extra) -> None:
    row["acts"].append({"at": at.isoformat(), "type": etype, "actor": p.get("actor") or p.get("requested_by"),
                        "reason": p.get("reason"), "position": pos, **extra})


def fold(state: HistoryState, rows: list) -> HistoryState:
    """Fold run_events rows (in position order) into `state`, in place."""
    for r in rows:
        pos, etype, run_id, at = r["global_position"], r["type"], r["run_id"], r["occurred_at"]
        try:
            payload = r["payload"] if isinstance(r["payload"], dict) else exactjson.loads(r["payload"])
            _apply(state, etype, run_id, at, pos, r["reason_code"], payload, str(r["event_id"]))
        except Exception as exc:  # noqa: BLE001 - any bug here must stop the projection at this position
            raise ProjectionError(pos, f"{etype}: {exc!r}") from exc
        state.last_position = pos
    return state


def _touch(state: HistoryState, row: dict, at: datetime, pos: int) -> dict:
    row["updated_at"], row["last_position"] = at, pos
    state.dirty_runs.add(row["run_id"])
    return row


def _apply(state: HistoryState, etype: str, run_id: str, at: datetime, pos: int, reason_code: str | None,
           p: dict, event_id: str) -> None:
    plan = p.get("plan") if isinstance(p.get("plan"), dict) else None
    row = state.runs.get(run_id)
    if etype == "prep.prepared" and plan:
        _dataset(state, plan["target"], p, run_id, at, pos)
    if row is None and plan and _trains(plan) and (etype in _STARTS or etype == "prep.prepared"
                                                  or etype.startswith("training.")):
        row = state.runs[run_id] = new_run(run_id, plan["target"], at, pos)
        row["locator"] = plan.get("locator")
    if etype in _REGISTRATIONS:
        _registered(state, etype, at, pos, p)
        return
    if etype in _LIFECYCLE:
        _lifecycle(state, etype, at, pos, p)
        return
    if row is None:
        return
    _touch(state, row, at, pos)
    if etype == "prep.prepared":
        row.update(train_rows=p.get("train_rows"), validation_rows=p.get("eval_rows"), test_rows=p.get("test_rows"),
                   dataset_version=p.get("dataset_version"), manifest_sha256=(p.get("manifest") or {}).get("sha256"),
                   test_set_sha256=(p.get("test_set") or {}).get("sha256") or row["test_set_sha256"])
        ds = state.datasets.get(row["target"], {}).get(p.get("dataset_version"))
        row["dataset_semver"] = ds["semver"] if ds else None
    elif etype in ("training.started", "training.completed"):
        row["recipe"] = p.get("recipe") or row["recipe"]
    elif etype == "training.cancel":
        _act(row, etype, p, at, pos)
    elif etype == "eval.completed":
        cand, base = p.get("candidate_report") or {}, p.get("baseline_report") or {}
        row.update(accuracy=(p.get("candidate") or {}).get("accuracy"),
                   baseline_accuracy=(p.get("base") or {}).get("accuracy"),
                   test_set_sha256=p.get("test_set_sha256") or row["test_set_sha256"])
        row["candidate_judge_mean"] = row["candidate_judge_mean"] if row["candidate_judge_mean"] is not None else cand.get("judge_mean")
        row["baseline_judge_mean"] = row["baseline_judge_mean"] if row["baseline_judge_mean"] is not None else base.get("judge_mean")
        row["baseline"] = row["baseline"] or base.get("model") or p.get("baseline_kind")
    elif etype == "eval.gate_decided":
        ev = p.get("evidence") or {}
        row.update(gate_passed=p.get("passed"), gate_failed=[f["reason_code"] for f in p.get("failed") or []],
                   gate_event_id=event_id,
                   baseline=p.get("baseline"), delta=ev.get("delta"), p_value=ev.get("p_value"), n=ev.get("n"),
                   candidate_judge_mean=ev.get("candidate_mean"), baseline_judge_mean=ev.get("baseline_mean"),
                   test_set_sha256=p.get("test_set_sha256") or row["test_set_sha256"])
    elif etype == "export.completed":
        row["export_sha256"] = (p.get("export") or {}).get("sha256")
    if etype in _STAGE_DONE and row["status"] == "running" and (plan or {}).get("until") == _STAGE_DONE[etype]:
        _set_status(row, "stopped")  # it went as far as its plan said, short of the registry
        row["ended_at"] = at
    if (fails(etype) or (etype == "bus.message_dead_lettered" and consumer_stage(p.get("consumer")))) \
            and row["status"] == "running":
        cancelled = reason_code == "training.cancelled"
        _set_status(row, "cancelled" if cancelled else "failed")
        row.update(ended_at=at, reason_code=reason_code, failure=(p.get("message") or p.get("error") or etype)[:500])


def _dataset(state: HistoryState, target: str, p: dict, run_id: str, at: datetime, pos: int) -> None:
    known = state.datasets.setdefault(target, {})
    version = p.get("dataset_version")
    if not version or version in known:
        return
    rows = int(p.get("train_rows") or 0) + int(p.get("eval_rows") or 0) + int(p.get("test_rows") or 0)
    space = [str(x) for x in p.get("label_space") or []]
    major, minor, patch = next_dataset_number(list(known.values()), space, rows)
    known[version] = {"target": target, "dataset_version": version, "semver": f"{major}.{minor}.{patch}",
                      "major": major, "minor": minor, "patch": patch, "label_space": space, "rows": rows,
                      "manifest_sha256": (p.get("manifest") or {}).get("sha256") or "", "first_run_id": run_id,
                      "first_position": pos, "prepared_at": at}
    state.dirty_datasets.add((target, version))


def _registered(state: HistoryState, etype: str, at: datetime, pos: int, p: dict) -> None:
    run_id, target, version = p.get("source_run_id"), p["target"], int(p["version"])
    row = state.runs.get(run_id)
    if row is None:  # a hosted job imported as a version: a fine-tune run that Tuneline did not start
        row = state.runs[run_id] = new_run(run_id, target, at, pos)
    if row["target"] != target:
        return  # registered on another target than its plan's: not this history's row to change
    _touch(state, row, at, pos)
    earlier = state.versions.get((target, version))
    if earlier is not None and earlier != run_id and earlier in state.runs:
        # a second registration of one version number (the registry never writes one; anyone on the bus
        # may): like the registry's fold, the later one is the version, and the earlier run is unlinked
        _touch(state, state.runs[earlier], at, pos)["version"] = None
    state.versions[(target, version)] = run_id
    gate = p.get("gate") or {}
    row.update(version=version, ended_at=at, reason_code=None, failure=None,
               export_sha256=(p.get("export") or {}).get("sha256") or row["export_sha256"],
               gate_passed=row["gate_passed"] if row["gate_passed"] is not None else gate.get("passed"),
               gate_event_id=row["gate_event_id"] or gate.get("event_id"),
               delta=row["delta"] if row["delta"] is not None else gate.get("delta"),
               p_value=row["p_value"] if row["p_value"] is not None else gate.get("p_value"),
               n=row["n"] if row["n"] is not None else gate.get("n"))
    if row["accuracy"] is None and p.get("candidate"):
        row["accuracy"], row["baseline_accuracy"] = p["candidate"].get("accuracy"), (p.get("base") or {}).get("accuracy")
    if etype == "registry.hosted_version_registered":
        row["recipe"] = row["recipe"] or f"hosted:{p.get('provider')}:{p.get('base_model')}"
    _set_status(row, "candidate")


def _version_row(state: HistoryState, target: str, version: int | None) -> dict | None:
    if version is None:
        return None
    run_id = state.versions.get((target, int(version)))
    return state.runs.get(run_id) if run_id else None


def _lifecycle(state: HistoryState, etype: str, at: datetime, pos: int, p: dict) -> None:
    target = p["target"]
    row = _version_row(state, target, p.get("version"))
    if row is None:
        return
    _touch(state, row, at, pos)
    if etype == "registry.validated":
        _set_status(row, "validated")
    elif etype == "registry.rejected":
        _set_status(row, "rejected")
        row["rejection_reason"] = p.get("reason")
    elif etype in ("registry.promoted", "registry.restored", "registry.rolled_back"):
        _set_status(row, "production")
        row["override"] = row["override"] or bool(p.get("override"))
        demoted = _version_row(state, target, p.get("demoted"))
        if demoted is not None and demoted is not row:
            _touch(state, demoted, at, pos)
            _set_status(demoted, "archived")
            _act(demoted, etype, p, at, pos, demoted=True)
    _act(row, etype, p, at, pos, **({"override": True} if p.get("override") else {}))


# --- storage ------------------------------------------------------------------------------------


def _row_from_db(r) -> dict:
    row = dict(r)
    row["acts"] = json.loads(row["acts"]) if isinstance(row["acts"], str) else list(row["acts"] or [])
    row["gate_failed"] = list(row["gate_failed"]) if row["gate_failed"] is not None else None
    return row


async def load(conn: asyncpg.Connection, rows: list) -> HistoryState:
    """The rows the batch's events can touch: its runs, the versions its registry events name (and their
    demoted versions), and the datasets of the targets it prepares for."""
    run_ids, keys, targets = set(), set(), set()
    for r in rows:
        run_ids.add(r["run_id"])
        if r["type"] in _LIFECYCLE or r["type"] in _REGISTRATIONS or r["type"] == "prep.prepared":
            p = r["payload"] if isinstance(r["payload"], dict) else exactjson.loads(r["payload"])
            if r["type"] == "prep.prepared":
                targets.add((p.get("plan") or {}).get("target"))
            elif r["type"] in _REGISTRATIONS:
                run_ids.add(p.get("source_run_id"))
                if p.get("version") is not None:  # the run holding that number before, if any
                    keys.add((p.get("target"), int(p["version"])))
            else:
                for v in (p.get("version"), p.get("demoted")):
                    if v is not None:
                        keys.add((p.get("target"), int(v)))
    state = HistoryState()
    found = await conn.fetch(
        "SELECT * FROM history_runs WHERE run_id = ANY($1::text[]) OR (target, version) IN "
        "(SELECT * FROM unnest($2::text[], $3::int[]))",
        [x for x in run_ids if x], [k[0] for k in keys], [k[1] for k in keys])
    for r in found:
        row = _row_from_db(r)
        state.runs[row["run_id"]] = row
        if row["version"] is not None:
            state.versions[(row["target"], row["version"])] = row["run_id"]
    for r in await conn.fetch("SELECT * FROM history_datasets WHERE target = ANY($1::text[])", [t for t in targets if t]):
        d = dict(r)
        d["label_space"] = list(d["label_space"])
        state.datasets.setdefault(d["target"], {})[d["dataset_version"]] = d
    return state


_UPSERT_RUN = "INSERT INTO history_runs ({cols}) VALUES ({values}) ON CONFLICT (run_id) DO UPDATE SET {sets}".format(
    cols=", ".join(RUN_COLUMNS), values=", ".join(f"${i}" for i in range(1, len(RUN_COLUMNS) + 1)),
    sets=", ".join(f"{c} = EXCLUDED.{c}" for c in RUN_COLUMNS[1:]))


async def _write(conn: asyncpg.Connection, state: HistoryState, checkpoint: int) -> None:
    # rows that lost their version number first: the (target, version) index is checked row by row
    runs = sorted((state.runs[k] for k in state.dirty_runs), key=lambda r: (r["version"] is not None, r["run_id"]))
    if runs:  # a batch touches a few runs: one prepared statement, executed per row
        await conn.executemany(_UPSERT_RUN, [tuple(json.dumps(r[c], sort_keys=True) if c == "acts" else r[c]
                                                   for c in RUN_COLUMNS) for r in runs])
    if state.dirty_datasets:
        records = [tuple(state.datasets[t][v][c] for c in DATASET_COLUMNS) for t, v in sorted(state.dirty_datasets)]
        await conn.copy_records_to_table("history_datasets", records=records, columns=DATASET_COLUMNS)
    await checkpoints.advance(conn, NAME, checkpoint)


async def _apply_batch(conn: asyncpg.Connection, rows: list, checkpoint: int) -> None:
    state = fold(await load(conn, rows), rows)
    await _write(conn, state, checkpoint)


async def catch_up(conn: asyncpg.Connection, batch_size: int = 2000, *, until: int | None = None,
                   on_batch=None) -> int:
    """Apply every event past the checkpoint (up to `until`, if given), one transaction per batch; stops on an
    error (D8). `on_batch(events, checkpoint)` is called after each batch commits."""
    return await checkpoints.catch_up(conn, NAME, _apply_batch, batch_size, until=until, on_batch=on_batch)


async def rebuild(conn: asyncpg.Connection, batch_size: int = 5000, *, until: int | None = None) -> int:
    """Drop the rows and replay run_events from position 0 (up to `until`) in one transaction; readers see
    the old rows until the commit and the live projector waits on the checkpoint's row lock."""
    return await checkpoints.rebuild(conn, NAME, ("history_runs", "history_datasets"), _apply_batch, batch_size,
                                     until=until)


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple]]:
    """Every row, ordered: what a rebuild must reproduce."""
    return {
        "history_runs": [tuple(r) for r in await conn.fetch("SELECT * FROM history_runs ORDER BY run_id")],
        "history_datasets": [tuple(r) for r in await conn.fetch(
            "SELECT * FROM history_datasets ORDER BY target, dataset_version")],
    }

