"""A target's History (the History projection's tables, history_runs / history_datasets) and a version's
lineage (from run_events), read the same way by the CLI (`tuneline history`, `tuneline lineage`) and the
API (D18). SQL and pure folding only; the callers shape the answers.

History: every fine-tune run of the target, promoted, rejected or abandoned, with what it was trained on, how it
scored against its baseline, what became of it and who acted, and the command that restores an archived version.
Lineage: a registered version back to its source, one hop at a time, each hop an event in run_events found by
the sha256 the hop before names (or, where an event names no artifact of the previous one, by causation id)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from contracts import subjects
from contracts.errors import ReasonCodedError
from services.common.registry_log import _like_escape, target_log
from services.common.registry_state import REGISTRATIONS, fold

PROJECTION = "history"  # its name in projection_checkpoints


class NotFound(ReasonCodedError):
    """A run, target or version that History does not hold."""


def _run_row(r) -> dict:
    row = dict(r)
    row["acts"] = json.loads(row["acts"]) if isinstance(row["acts"], str) else list(row["acts"] or [])
    row["gate_failed"] = list(row["gate_failed"]) if row["gate_failed"] is not None else None
    return row


async def checkpoint(conn) -> dict:
    """How far the History projection has read run_events, and where it stopped on an error (if it did)."""
    cp = await conn.fetchrow("SELECT position, error_position, error FROM projection_checkpoints WHERE projection = $1",
                             PROJECTION)
    return {"position": cp["position"] if cp else 0, "stopped": dict(cp) if cp and cp["error_position"] else None}


async def target_history(conn, target: str) -> dict | None:
    """The target's runs (oldest first) and datasets, or None when the projection holds no run of it."""
    runs = await conn.fetch("SELECT * FROM history_runs WHERE target = $1 ORDER BY started_at, run_id", target)
    if not runs:
        return None
    datasets = await conn.fetch("SELECT * FROM history_datasets WHERE target = $1 ORDER BY major, minor, patch", target)
    out_runs = []
    for r in runs:
        row = _run_row(r)
        row["restore"] = (f'tuneline restore {target} {row["version"]} --reason "..."'
                          if row["status"] == "archived" else None)
        out_runs.append(row)
    return {"target": target, "runs": out_runs, "datasets": [dict(d) | {"label_space": list(d["label_space"])}
                                                             for d in datasets], **await checkpoint(conn)}


async def version_run(conn, target: str, version: int) -> dict | None:
    """The History row of a target's registered version (the run that produced it), or None."""
    r = await conn.fetchrow("SELECT * FROM history_runs WHERE target = $1 AND version = $2", target, version)
    return None if r is None else _run_row(r)


async def dataset(conn, target: str, dataset_version: str | None) -> dict | None:
    if not dataset_version:
        return None
    r = await conn.fetchrow("SELECT * FROM history_datasets WHERE target = $1 AND dataset_version = $2",
                            target, dataset_version)
    return None if r is None else dict(r) | {"label_space": list(r["label_space"])}


_VERSION_REF = re.compile(r"v?(\d+)")


async def find_version(conn, target: str, ref: str) -> dict:
    """The History row of a version named as N, vN, or the run id that produced it. Raises NotFound."""
    if not subjects.is_subject_token(target):
        raise NotFound("registry.invalid_target", f"target {target!r} is not a valid name ([A-Za-z0-9_-]+)")
    m = _VERSION_REF.fullmatch(ref.strip())
    if m:
        row = await version_run(conn, target, int(m.group(1)))
    else:
        r = await conn.fetchrow("SELECT * FROM history_runs WHERE target = $1 AND run_id = $2 AND version IS NOT NULL",
                                target, ref)
        row = None if r is None else _run_row(r)
    if row is None:
        raise NotFound("registry.version_not_found", f"target {target} has no version {ref!r} in History "
                                                     "(neither a version number nor a run registered on it)")
    return row


async def registry_sequence(conn, target: str, upto: int) -> int:
    """The position of the target's last registry event at or before `upto` (the History's position): the
    `expected_sequence` a command decided on that History carries, so that an act on a History the
    registry has moved past is refused (registry.conflict) rather than applied to a state nobody saw."""
    prefix = subjects.registry_target_filter(target)[:-1]
    return await conn.fetchval("SELECT coalesce(max(global_position), 0) FROM run_events "
                               "WHERE subject LIKE $1 ESCAPE '\\' AND global_position <= $2",
                               _like_escape(prefix) + "%", upto) or 0


async def read_history(conn, target: str) -> dict:
    if not subjects.is_subject_token(target):
        raise NotFound("audit.history_target_not_found", f"target {target!r} is not a valid name ([A-Za-z0-9_-]+)")
    h = await target_history(conn, target)
    if h is None:
        raise NotFound("audit.history_target_not_found", f"no fine-tune run of target {target} in History "
                                                   "(`tuneline rebuild history` if the projection is new)")
    return h


# --- lineage ---------------------------------------------------------------------------------------


@dataclass
class Hop:
    hop: str                     # what this link is
    sha256: str | None           # the artifact that links it to the hop before
    event_type: str | None       # the event in run_events that produced it
    event_id: str | None
    position: int | None
    by: str                      # "sha256" or "causation" (how it was found), "unresolved"
    detail: str


def _sha(payload: dict, *path: str) -> str | None:
    v = payload
    for k in path:
        v = (v or {}).get(k) if isinstance(v, dict) else None
    return v if isinstance(v, str) else None


def _find(events: list[dict], etype: str, *path: str, sha: str | None) -> dict | None:
    """The first event of `etype` whose artifact at `path` has this sha256."""
    if sha is None:
        return None
    return next((e for e in events if e["type"] == etype and _sha(e["payload"], *path, "sha256") == sha), None)


def _hop(name: str, sha: str | None, e: dict | None, by: str, detail: str) -> Hop:
    if e is None:
        return Hop(name, sha, None, None, None, "unresolved", detail)
    return Hop(name, sha, e["type"], str(e["event_id"]), e["global_position"], by, detail)


def lineage_chain(registration: dict, events: list[dict], semver_of: dict[str, str],
                  read_manifest: Callable[[dict], dict | None] = lambda ref: None) -> list[Hop]:
    """The hops from a registered version (`registration`: its registry event as a dict with its payload) back
    to its source, over the source run's events (dicts with type, event_id, causation_id, global_position,
    payload), oldest first. Pure but for `read_manifest` (the manifest artifact, sha256-checked, or None)."""
    p = registration["payload"]
    hops = [_hop("registered version", _sha(p, "export", "sha256"), registration, "sha256",
                 f"{p['target']} v{p['version']} from run {p['source_run_id']}")]
    if registration["type"] == "registry.hosted_version_registered":
        hops.append(Hop("hosted fine-tune", p.get("training_file_sha256"), None, None, None, "hosted",
                        f"{p['provider']} job {p['hosted_job_id']} -> {p['fine_tuned_model']} on {p['base_model']}; "
                        f"training file sha256 {p.get('training_file_sha256') or 'not kept by the provider'}"))
        return hops
    export_sha = _sha(p, "export", "sha256")
    export = _find(events, "export.completed", "export", sha=export_sha)
    hops.append(_hop("export", export_sha, export, "sha256",
                     f"{export['payload']['format']}, {len(export['payload']['files'])} files" if export else
                     "no export.completed of this sha256 in the run"))
    by_id = {str(e["event_id"]): e for e in events}
    evaluated = by_id.get(str(export["causation_id"])) if export and export.get("causation_id") else None
    adapter_sha = _sha(evaluated["payload"], "adapter", "sha256") if evaluated else None
    trained = _find(events, "training.completed", "adapter", sha=adapter_sha)
    if trained is None and evaluated is not None and evaluated.get("causation_id"):
        trained = by_id.get(str(evaluated["causation_id"]))  # a hosted candidate: no adapter artifact
    tp = trained["payload"] if trained else {}
    hops.append(_hop("adapter", adapter_sha, trained, "sha256" if adapter_sha else "causation",
                     f"exported from the adapter the evaluation scored (eval.completed {evaluated['event_id']})"
                     if evaluated else "the export's evaluation is not in the run"))
    hops.append(_hop("training run", adapter_sha, trained, "sha256" if adapter_sha else "causation",
                     f"recipe {tp.get('recipe') or '?'} ({tp.get('backend', 'local')}) on {tp.get('base_model')}, "
                     f"{tp.get('steps')} steps" + (f", hosted job {tp['hosted_job_id']}" if tp.get("hosted_job_id") else "")
                     if trained else "no training.completed of this adapter in the run"))
    manifest_sha = _sha(tp, "manifest", "sha256") or _sha(p, "manifest", "sha256")
    prepared = _find(events, "prep.prepared", "manifest", sha=manifest_sha)
    pp = prepared["payload"] if prepared else {}
    version = pp.get("dataset_version") or p.get("dataset_version")
    registered_as = ("" if not p.get("manifest") else "; the registration names this manifest"
                     if _sha(p, "manifest", "sha256") == manifest_sha else "; the registration names ANOTHER manifest")
    hops.append(_hop("dataset and manifest", manifest_sha, prepared, "sha256",
                     f"dataset {semver_of.get(version, '?')} ({version}): {pp.get('train_rows')} train / "
                     f"{pp.get('eval_rows')} validation / {pp.get('test_rows')} test rows over {len(pp.get('label_space') or [])} "
                     f"labels; train {(_sha(pp, 'train', 'sha256') or '?')[:16]}, test {(_sha(pp, 'test', 'sha256') or '?')[:16]}"
                     + registered_as if prepared else "no prep.prepared of this manifest in the run"))
    # prep names its source only inside the manifest (source_sha256): read it back where the artifact is here
    manifest = read_manifest(pp["manifest"]) if prepared else None
    source_sha = (manifest or {}).get("source_sha256")
    committed = _find(events, "ingest.committed", "dataset", sha=source_sha)
    by = "sha256"
    if committed is None and prepared is not None and prepared.get("causation_id"):
        committed, by = by_id.get(str(prepared["causation_id"])), "causation"
    cp = committed["payload"] if committed else {}
    hops.append(_hop("accepted rows", _sha(cp, "dataset", "sha256") or source_sha, committed, by,
                     f"{cp.get('rows_accepted')} of {cp.get('rows_read')} rows read from {(cp.get('plan') or {}).get('locator')}"
                     if committed else "no ingest.committed in the run"))
    hops.append(_hop("rejected rows", _sha(cp, "rejected", "sha256"), committed, by,
                     f"{cp.get('rows_rejected')} rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(
                         (cp.get("rejected_by_reason") or {}).items())) if committed else "-"))
    cleaned = next((e for e in events if e["type"] == "prep.cleaned" and prepared is not None
                    and e.get("causation_id") == prepared.get("causation_id")), None)
    hops.append(_hop("dropped rows (cleaning)", _sha(cleaned["payload"], "dropped", "sha256") if cleaned else None,
                     cleaned, "causation", (f"{sum((cleaned['payload'].get('dropped_by_reason') or {}).values())} dropped"
                                            + "".join(f", {k.split('.', 1)[-1]} {v}" for k, v in sorted(
                                                (cleaned["payload"].get("dropped_by_reason") or {}).items())))
                     if cleaned else "-"))
    hops.append(_hop("source", None, committed, by, f"locator {(cp.get('plan') or {}).get('locator')}"
                     + (f", source {json.dumps(cp.get('source'), sort_keys=True)[:200]}" if cp.get("source") else "")
                     if committed else "-"))
    return hops


def manifest_reader(ref: dict) -> dict | None:
    from contracts.common import ArtifactRef
    from services.common.run_artifacts import store_of

    try:
        r = ArtifactRef.model_validate(ref)
        doc = json.loads(store_of(r).read_bytes(r))
    except Exception:  # noqa: BLE001 - not here, not file://, corrupt: the hop falls back to causation
        return None
    return doc if isinstance(doc, dict) else None


async def read_lineage(conn, target: str, ref: str, read_manifest=manifest_reader) -> dict:
    from services.registry.domain import Refusal, resolve_version

    if not subjects.is_subject_token(target):
        raise NotFound("registry.invalid_target", f"target {target!r} is not a valid name ([A-Za-z0-9_-]+)")
    log = await target_log(conn, target)
    state = fold(target, log)
    found = resolve_version(state, ref)
    if isinstance(found, Refusal):
        raise NotFound(found.reason_code, str(found.message))
    registration = next(e for _, e in log if e["type"] in REGISTRATIONS and e["payload"]["version"] == found.number)
    row = await conn.fetchrow("SELECT global_position, causation_id FROM run_events WHERE event_id = $1::uuid",
                              registration["event_id"])
    registration = {**registration, "global_position": row["global_position"] if row else None,
                    "causation_id": str(row["causation_id"]) if row and row["causation_id"] else None}
    rows = await conn.fetch("SELECT global_position, event_id, type, causation_id, payload FROM run_events "
                            "WHERE run_id = $1 ORDER BY global_position", found.source_run_id)
    events = [{"global_position": r["global_position"], "event_id": str(r["event_id"]), "type": r["type"],
               "causation_id": str(r["causation_id"]) if r["causation_id"] else None,
               "payload": json.loads(r["payload"])} for r in rows]
    semver = {r["dataset_version"]: r["semver"] for r in await conn.fetch(
        "SELECT dataset_version, semver FROM history_datasets WHERE target = $1", target)}
    hops = lineage_chain(registration, events, semver, read_manifest)
    p = registration["payload"]
    return {"target": target, "version": found.number, "run_id": found.source_run_id,
            "base_model": p.get("base_model"), "base_model_sha256": (p.get("base_model_pin") or {}).get("sha256"),
            "hops": [asdict(h) for h in hops], "unresolved": [h.hop for h in hops if h.by == "unresolved"]}
