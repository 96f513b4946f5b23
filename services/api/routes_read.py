"""The API's read side: runs, their timeline, events, training curve, evaluation; targets' History (the
History projection), what served them, a version's lineage and counterfactual gate replay; failure
clusters; a run's live stream."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from contracts.subjects import is_subject_token
from services.api import history_views, reads
from services.api.auth import Principal, reader
from services.api.live import run_stream
from services.common.eval_report import decision_in_words, render, report_of
from services.common import registry_log

router = APIRouter(prefix="/api", tags=["read"])

MAX_PAGE = 500
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")]
Status = Literal["running", "paused", "succeeded", "failed"]
Stage = Literal["ingest", "prep", "trainer", "evaluator", "export", "registry"]
Severity = Literal["info", "warning", "error", "critical"]
Name = Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


def utc(at: datetime | None) -> datetime | None:
    return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)


def check_range(since: datetime | None, until: datetime | None) -> None:
    if since and until and utc(since) >= utc(until):
        raise HTTPException(422, [{"loc": ["query", "until"], "msg": "until must be after since",
                                   "type": "value_error"}])


async def _conn(request: Request):
    async with request.app.state.pool.acquire() as conn:
        yield conn


Conn = Depends(_conn)


async def _known_run(conn, run_id: str) -> None:
    if not await reads.run_exists(conn, run_id):
        raise HTTPException(404, f"no run {run_id} is recorded")


@router.get("/runs", summary="Runs, newest first, from the timeline projection")
async def list_runs(target: Name | None = None, status: Status | None = None, stage: Stage | None = None,
                    since: datetime | None = None, until: datetime | None = None, reason_code: Name | None = None,
                    limit: Limit = 50, offset: Annotated[int, Query(ge=0)] = 0,
                    _: Principal = Depends(reader), conn=Conn) -> dict:
    check_range(since, until)
    runs = await reads.list_runs(conn, target=target, status=status, stage=stage, since=utc(since), until=utc(until),
                                 reason_code=reason_code, limit=limit, offset=offset)
    return {"runs": runs, "limit": limit, "offset": offset}


@router.get("/runs/{run_id}", summary="A run's timeline: its stages and entries")
async def run_timeline(run_id: str, _: Principal = Depends(reader), conn=Conn) -> dict:
    tl = await reads.run_timeline(conn, run_id)
    if tl is None:
        raise HTTPException(404, f"no run {run_id} in the timeline")
    return tl


async def _events(conn, run_id, after, limit, type, severity, reason_code) -> dict:
    found = await reads.events(conn, run_id=run_id, after=after, limit=limit, type=type, severity=severity,
                               reason_code=reason_code)
    return {"events": found, "next_after": found[-1]["global_position"] if len(found) == limit else None}


@router.get("/runs/{run_id}/events", summary="A run's events from run_events, paged by global position")
async def run_events(run_id: str, after: Annotated[int, Query(ge=0)] = 0, limit: Limit = 100,
                     type: Name | None = None, severity: Severity | None = None, reason_code: Name | None = None,
                     _: Principal = Depends(reader), conn=Conn) -> dict:
    await _known_run(conn, run_id)
    return await _events(conn, run_id, after, limit, type, severity, reason_code)


@router.get("/events", summary="Every run's events (the event explorer), paged by global position")
async def all_events(run_id: Name | None = None, after: Annotated[int, Query(ge=0)] = 0, limit: Limit = 100,
                     type: Name | None = None, severity: Severity | None = None, reason_code: Name | None = None,
                     _: Principal = Depends(reader), conn=Conn) -> dict:
    return await _events(conn, run_id, after, limit, type, severity, reason_code)


@router.get("/runs/{run_id}/curve", summary="Training loss per step and the mid-training evaluations")
async def run_curve(run_id: str, _: Principal = Depends(reader), conn=Conn) -> dict:
    await _known_run(conn, run_id)
    return reads.curve(await reads.run_events(conn, run_id, reads.CURVE_TYPES))


@router.get("/runs/{run_id}/evaluation", summary="The run's evaluation report and gate decision")
async def run_evaluation(run_id: str, _: Principal = Depends(reader), conn=Conn) -> dict:
    await _known_run(conn, run_id)
    report = report_of(await reads.run_events(conn, run_id, ("eval.completed", "eval.gate_decided",
                                                             "judge.validated", "eval.failed")))
    if report is None:
        raise HTTPException(404, f"no evaluation recorded for run {run_id}")
    return {"report": report, "decision": decision_in_words(report), "text": render(report)}


@router.get("/runs/{run_id}/bundle", summary="A support bundle for the run, as one zip",
            response_class=Response,
            responses={200: {"content": {"application/zip": {}},
                             "description": "the run's events, the ids that find its logs, its manifest and "
                                            "artifact references, environment versions; secrets masked"}})
async def run_bundle(request: Request, run_id: str, _: Principal = Depends(reader), conn=Conn) -> Response:
    from services.common.bundle import build_bundle, nats_server_version

    settings = request.app.state.settings
    bundle = await build_bundle(conn, run_id, nats_server=nats_server_version(request.app.state.nc),
                                urls=(settings.database_url, settings.nats_url))
    if bundle is None:
        raise HTTPException(404, f"no run {run_id} is recorded")
    return Response(bundle.data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{bundle.filename}"'})


@router.get("/runs/{run_id}/stream", summary="The run's events live, as Server-Sent Events",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "one `data:` JSON per event (position, type, stage, status); "
                                            "`id:` is the global position"}})
async def run_live(request: Request, run_id: str, after: Annotated[int | None, Query(ge=0)] = None,
                   _: Principal = Depends(reader)):
    async with request.app.state.pool.acquire() as conn:
        first = await conn.fetchval("SELECT min(global_position) FROM run_events WHERE run_id = $1", run_id)
    if first is None:
        raise HTTPException(404, f"no run {run_id} is recorded")
    last_seen = request.headers.get("last-event-id")
    if after is None:
        after = int(last_seen) if last_seen and last_seen.isdigit() else first - 1
    body = run_stream(request.app.state.js, request.app.state.feeds, run_id, after, request.app.state.settings.sse_ping_s)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- targets -------------------------------------------------------------------------------------------


def _target(target: str) -> str:
    if not is_subject_token(target):
        raise HTTPException(422, [{"loc": ["path", "target"], "msg": "a target is [A-Za-z0-9_-]+",
                                   "type": "value_error"}])
    return target


@router.get("/targets", summary="Every target runs named or the registry keeps a log for")
async def list_targets(_: Principal = Depends(reader), conn=Conn) -> dict:
    return {"targets": await reads.targets(conn)}


@router.get("/targets/{target}", summary="A target's History (the History projection): every fine-tune run, "
                                         "its version, what became of it and who acted; its datasets")
async def get_target(target: str, _: Principal = Depends(reader), conn=Conn) -> dict:
    return await history_views.target_view(conn, _target(target))


VersionRef = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                 description="N, vN, or the run id that produced it")]


@router.get("/targets/{target}/versions/{version}",
            summary="A version: its History row, dataset, base model, parent version, gate evidence and lineage")
async def get_version(target: str, version: VersionRef, _: Principal = Depends(reader), conn=Conn) -> dict:
    return await history_views.version_view(conn, _target(target), version)


@router.get("/targets/{target}/versions/{version}/lineage",
            summary="A version back to its source: export, adapter, training, dataset and manifest, rows")
async def get_lineage(target: str, version: VersionRef, _: Principal = Depends(reader), conn=Conn) -> dict:
    return (await history_views.version_view(conn, _target(target), version))["lineage"]


Share = Annotated[float | None, Query(ge=0, le=1)]


@router.get("/targets/{target}/versions/{version}/gate-replay",
            summary="The version's gate decision re-run under other settings (counterfactual, read-only)")
async def gate_replay(target: str, version: VersionRef,
                      min_delta: Annotated[float | None, Query(ge=0, le=0.99, description="the margin")] = None,
                      alpha: Annotated[float | None, Query(gt=0, lt=1)] = None,
                      max_bucket_drop: Share = None, max_regressed_share: Annotated[float | None, Query(gt=0, le=1)] = None,
                      _: Principal = Depends(reader), conn=Conn) -> dict:
    return await history_views.replay_view(conn, _target(target), version, {
        "min_delta": min_delta, "alpha": alpha, "max_bucket_drop": max_bucket_drop,
        "max_regressed_share": max_regressed_share})


@router.get("/targets/{target}/serving", summary="What served the target now, or at a time (`at`), and why")
async def get_serving(target: str, at: datetime | None = None, _: Principal = Depends(reader), conn=Conn) -> dict:
    _target(target)
    try:
        return await registry_log.serving_at(conn, target, utc(at))
    except registry_log.TargetNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except registry_log.InvalidTime as exc:
        raise HTTPException(422, [{"loc": ["query", "at"], "msg": str(exc), "type": "value_error"}]) from None


@router.get("/failures", summary="Failures and warnings grouped by stage and reason code")
async def failures(since: datetime | None = None, until: datetime | None = None, target: Name | None = None,
                   _: Principal = Depends(reader), conn=Conn) -> dict:
    check_range(since, until)
    return {"clusters": await reads.failure_clusters(conn, since=utc(since), until=utc(until), target=target)}
