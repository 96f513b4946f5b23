"""A target's History, a version's lineage and its counterfactual gate replay, shaped for the API and the
page (D18). History is the History projection (history_runs / history_datasets), never the registry log
refolded; lineage and the replay are services/common's, shared with the CLI."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime

from fastapi import HTTPException

from services.api import reads
from services.common import gate_replay, history

_PRODUCTION_BASELINE = re.compile(r"production:v(\d+)")
PROMOTIONS = ("registry.promoted", "registry.restored", "registry.rolled_back")


def _iso(at) -> str | None:
    return at.isoformat() if isinstance(at, datetime) else at


def _gate(row: dict) -> dict | None:
    if row["gate_passed"] is None:
        return None
    return {"passed": row["gate_passed"], "failed": row["gate_failed"] or [], "delta": row["delta"],
            "p_value": row["p_value"], "n": row["n"], "baseline": row["baseline"], "event_id": row["gate_event_id"]}


def run_entry(row: dict) -> dict:
    """One History row as the API answers it."""
    return {"run_id": row["run_id"], "version": row["version"], "status": row["status"], "outcome": row["outcome"],
            "started_at": _iso(row["started_at"]), "ended_at": _iso(row["ended_at"]), "recipe": row["recipe"],
            "train_rows": row["train_rows"], "dataset_version": row["dataset_version"],
            "dataset_semver": row["dataset_semver"], "accuracy": row["accuracy"],
            "baseline_accuracy": row["baseline_accuracy"], "candidate_judge_mean": row["candidate_judge_mean"],
            "baseline_judge_mean": row["baseline_judge_mean"], "gate": _gate(row), "override": row["override"],
            "rejection_reason": row["rejection_reason"], "reason_code": row["reason_code"], "failure": row["failure"],
            "export_sha256": row["export_sha256"], "acts": row["acts"], "restore": row.get("restore")}


async def target_view(conn, target: str) -> dict:
    """The target's History from the projection: every fine-tune run (newest first) with its version, what
    became of it and who acted, its datasets, what is production per History, the position History has read
    run_events to, and the registry sequence a command decided on this view carries."""
    found = await history.target_history(conn, target)
    if found is None:
        if not await reads.target_known(conn, target):
            raise HTTPException(404, f"no target {target}: no run named it and the registry has no log for it")
        found = {"target": target, "runs": [], "datasets": [], **await history.checkpoint(conn)}
    runs = list(reversed(found["runs"]))
    prod = next((r for r in runs if r["status"] == "production"), None)
    production = None
    if prod is not None:
        act = next((a for a in reversed(prod["acts"]) if a["type"] in PROMOTIONS), {})
        production = {"version": prod["version"], "run_id": prod["run_id"], "since": act.get("at"),
                      "by": act.get("actor"), "reason": act.get("reason"), "event_type": act.get("type"),
                      "override": bool(act.get("override"))}
    acts = sorted(({**a, "version": r["version"], "run_id": r["run_id"]} for r in runs for a in r["acts"]
                   if not a.get("demoted")), key=lambda a: a["position"], reverse=True)
    return {"target": target, "history_position": found["position"], "stopped": found["stopped"],
            "last_sequence": await history.registry_sequence(conn, target, found["position"]),
            "production": production, "runs": [run_entry(r) for r in runs],
            "versions": [run_entry(r) for r in sorted((r for r in runs if r["version"] is not None),
                                                      key=lambda r: r["version"], reverse=True)],
            "datasets": [{**d, "prepared_at": _iso(d["prepared_at"])} for d in found["datasets"]], "acts": acts}


def _not_found(exc: history.NotFound) -> HTTPException:
    return HTTPException(404, {"reason_code": exc.reason_code, "message": str(exc)})


def parent_of(row: dict) -> dict:
    """What the version was measured against: the production version it had to beat (its parent in the
    target's line), or the prompt / classical baseline a first version is compared with."""
    m = _PRODUCTION_BASELINE.fullmatch(row["baseline"] or "")
    if m:
        return {"version": int(m.group(1)), "baseline": row["baseline"],
                "words": f"v{m.group(1)}, production when it was evaluated (its gate's baseline)"}
    return {"version": None, "baseline": row["baseline"],
            "words": "none: no version was in production when it was evaluated"
                     + (f" (the gate compared it with {row['baseline']})" if row["baseline"] else "")}


async def version_view(conn, target: str, ref: str) -> dict:
    """A version's History row, dataset, parent, recorded gate decision and lineage back to its source."""
    try:
        row = await history.find_version(conn, target, ref)
        lineage = await history.read_lineage(conn, target, str(row["version"]))
    except history.NotFound as exc:
        raise _not_found(exc) from None
    decision = await gate_replay.version_decision(conn, row["gate_event_id"]) if row["gate_event_id"] else None
    gate = None
    if decision is not None:
        from services.api.pages import gate_in_words

        p = decision["payload"]
        gate = {"event_id": decision["event_id"], "passed": p["passed"], "baseline": p["baseline"],
                "baseline_kind": p.get("baseline_kind"), "failed": p.get("failed") or [],
                "evidence": {k: (p.get("evidence") or {}).get(k) for k in ("n", "delta", "p_value", "candidate_mean",
                                                                           "baseline_mean", "test")},
                "policy": gate_replay.recorded_policy(p), "test_set_sha256": p.get("test_set_sha256"),
                "judge_id": p.get("judge_id"), "words": gate_in_words({"eval.gate_decided": p})}
    return {"target": target, "version": row["version"], "run": run_entry(row),
            "dataset": await history.dataset(conn, target, row["dataset_version"]),
            "base_model": lineage.get("base_model"), "base_model_sha256": lineage.get("base_model_sha256"),
            "parent": parent_of(row), "gate": gate, "lineage": lineage}


async def replay_view(conn, target: str, ref: str, changes: dict[str, float | None]) -> dict:
    """The version's recorded gate decision re-run under the recorded policy with `changes`: the
    counterfactual decision, in words. Read-only."""
    try:
        row = await history.find_version(conn, target, ref)
    except history.NotFound as exc:
        raise _not_found(exc) from None
    decision = await gate_replay.version_decision(conn, row["gate_event_id"]) if row["gate_event_id"] else None
    if decision is None:
        raise HTTPException(404, {"reason_code": "audit.replay_no_decision",
                                  "message": f"{target} v{row['version']} has no gate decision recorded to replay"})
    gate = decision["payload"]
    try:
        policy = gate_replay.counterfactual_policy(gate, **changes)
    except ValueError as exc:
        raise HTTPException(422, [{"loc": ["query"], "msg": str(exc), "type": "value_error"}]) from None
    # reading the records and the gate's statistics (a bootstrap for continuous scores) are not the event
    # loop's work: the other requests and the live streams go on meanwhile
    r = await asyncio.to_thread(gate_replay.replay_decision, decision, policy)
    return {"target": target, "version": row["version"], "gate_event_id": decision["event_id"],
            "recorded_policy": gate_replay.recorded_policy(gate), "policy": policy.as_dict(),
            "was_passed": r.was_passed, "now_passed": r.now_passed, "flipped": r.flipped,
            "rederived": r.rederived, "now_failed": r.now_failed, "delta": r.delta, "p_value": r.p_value, "n": r.n,
            "unreplayable": r.unreplayable, "words": gate_replay.in_words(r, policy, gate.get("baseline"))}
