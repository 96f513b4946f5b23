"""The replay verbs for an operator token (the same code as `tuneline replay ...`): rebuild a projection
blue/green, rebuild the store from the bus into another database and diff it, re-drive a durable consumer in
place or in a sandbox, re-run a run from a stage. Each is recorded on the bus as its replay event with the
token's subject as `requested_by` and the API as producer.

These act as the database owner named by DATABASE_URL (a new version's schema is DDL) and on the bus with the
API's connection: the only routes of the API that do more than publish commands, and only for `operate`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from contracts import subjects
from services.api.auth import Principal, operator
from services.audit import replay_events
from services.audit.replay import NAMES
from services.common.bus import publish
from services.common.commands import envelope_of
from services.common.ids import new_run_id

router = APIRouter(prefix="/api/replay", tags=["replay"])

Projection = Literal[NAMES]  # type: ignore[valid-type]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectionBody(Body):
    switch: bool = Field(False, description="switch readers to the new version even if it differs")


class StoreBody(Body):
    into: str = Field(min_length=1, max_length=2000, description="the database to rebuild into (created if absent; "
                                                                 "refused if it is the live one or holds events)")


class ConsumerBody(Body):
    start: str = Field(alias="from", min_length=1, max_length=64, description="a stream sequence or an ISO 8601 time")
    sandbox: bool = Field(False, description="replay into a separate stream and database and diff the outputs")
    sandbox_db: str | None = Field(None, max_length=2000)
    settle_s: float = Field(10.0, gt=0, le=600)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RunBody(Body):
    from_stage: Literal["ingest", "prep", "trainer", "evaluator", "export", "registry"]
    new_run_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")


def _urls(request: Request) -> tuple[str, str]:
    settings = request.app.state.settings
    url = settings.nats_url
    options = settings.nats_options
    if options:
        from services.common.nats_auth import with_credentials

        url = with_credentials(url, options["user"], options["password"])
    return url, settings.database_url


async def _record(request: Request, recorded: replay_events.Recorded) -> str:
    event, severity, reason_code = recorded
    env = envelope_of(event, f"replay-{new_run_id()}", "api", severity=severity, reason_code=reason_code)
    await publish(request.app.state.js, env, subjects.subject_for(env.type, kind="event"))
    return str(env.event_id)


def _refused(reason_code: str, exc: Exception, status: int = 422) -> HTTPException:
    return HTTPException(status, {"reason_code": reason_code, "detail": str(exc)})


def _needs_more_than_commands(request: Request, what: str) -> None:
    """Refuse, before anything is published, a replay the API's own NATS user may not carry out.

    Under per-service NATS users the API publishes only commands (and replay records): re-running a run
    republishes a stage's trigger, and the serving view's versions are key-value buckets it may not write.
    Those stay with `tuneline replay ...` and the operator's credential."""
    if request.app.state.settings.nats_options:
        raise HTTPException(403, {"reason_code": "audit.replay_publish_refused",
                                  "detail": f"{what} needs NATS rights the API's user does not have (it publishes "
                                            "commands only); run it with `tuneline replay` as an operator"})


@router.post("/projections/{name}", summary="Rebuild a projection blue/green, compare, switch when identical")
async def replay_projection(request: Request, name: Projection, body: ProjectionBody,
                            who: Principal = Depends(operator)) -> dict:
    from services.audit import replay, replay_serving
    from services.audit.projections.checkpoints import ProjectionError

    if name == "serving":
        _needs_more_than_commands(request, "rebuilding the serving view (key-value buckets)")
    nats_url, dsn = _urls(request)
    try:
        if name == "serving":
            report = await replay_serving.rebuild_beside(nats_url, dsn, actor=who.subject, switch=body.switch)
        else:
            report = await replay.rebuild_beside(dsn, name, actor=who.subject, switch=body.switch)
    except replay.ReplayRefused as exc:
        raise _refused("audit.projection_replay_failed", exc, 409) from None
    except ProjectionError as exc:
        event_id = await _record(request, replay_events.projection_failed(name, who.subject, exc))
        raise HTTPException(500, {"reason_code": "audit.projection_replay_failed", "detail": str(exc),
                                  "event_id": event_id}) from None
    recorded = replay_events.projection_event(report, who.subject)
    return {**recorded[0].model_dump(mode="json"), "identical": report.identical, "reason_code": recorded[2],
            "samples": {t: d.samples for t, d in report.differences.items()},
            "event_id": await _record(request, recorded)}


@router.delete("/projections/{name}/versions/{version}", summary="Drop a version of a projection that is not live")
async def drop_projection_version(request: Request, name: Projection, version: int,
                                  who: Principal = Depends(operator)) -> dict:
    from services.audit import replay, replay_serving

    if name == "serving":
        _needs_more_than_commands(request, "dropping a version of the serving view (a key-value bucket)")
    nats_url, dsn = _urls(request)
    try:
        if name == "serving":
            await replay_serving.drop_version(nats_url, dsn, version)
        else:
            await replay.drop_version(dsn, name, version)
    except replay.ReplayRefused as exc:
        raise _refused("audit.projection_replay_failed", exc, 409) from None
    return {"projection": name, "version": version, "state": "dropped"}


@router.post("/store", summary="Rebuild run_events from the stream into another database and diff it with the live one")
async def replay_store(request: Request, body: StoreBody, who: Principal = Depends(operator)) -> dict:
    from services.audit import replay_store as rs

    nats_url, dsn = _urls(request)
    try:
        report = await rs.replay_store(nats_url, dsn, body.into)
    except rs.StoreReplayRefused as exc:
        raise _refused("audit.store_replay_refused", exc) from None
    except Exception as exc:  # noqa: BLE001 - recorded as a failed replay, then answered
        event_id = await _record(request, replay_events.store_failed(rs.where(body.into), who.subject, exc))
        raise HTTPException(500, {"reason_code": "audit.store_replay_failed", "detail": repr(exc)[:500],
                                  "event_id": event_id}) from None
    recorded = replay_events.store_event(report, who.subject)
    return {**recorded[0].model_dump(mode="json"), "identical": report.identical, "reason_code": recorded[2],
            "skipped": report.skipped, "live_settled": report.live_settled,
            "hashes_compared": report.diff.hashes_compared, "event_id": await _record(request, recorded)}


@router.post("/consumers/{durable}", summary="Re-drive a durable consumer from a position, in place or in a sandbox")
async def replay_consumer(request: Request, durable: str, body: ConsumerBody, who: Principal = Depends(operator)) -> dict:
    from services.audit import replay_consumer as rc

    nats_url, dsn = _urls(request)
    try:
        start = rc.parse_position(body.start)
        rc.consumer_spec(durable)
        if body.sandbox:
            report = await rc.replay_in_sandbox(nats_url, dsn, durable, start, sandbox_db=body.sandbox_db,
                                                data_dir=request.app.state.settings.data_dir, settle_s=body.settle_s)
        else:
            report = await rc.redrive_in_place(nats_url, dsn, durable, start)
    except rc.ConsumerReplayRefused as exc:
        raise _refused(exc.reason_code, exc, 404 if exc.reason_code == "audit.replay_consumer_unknown" else 422) from None
    except Exception as exc:  # noqa: BLE001 - recorded as a failed replay, then answered
        event_id = await _record(request, replay_events.consumer_failed(durable, body.sandbox, start, who.subject, exc))
        raise HTTPException(500, {"reason_code": "audit.consumer_replay_failed", "detail": repr(exc)[:500],
                                  "event_id": event_id}) from None
    recorded = replay_events.consumer_event(report, who.subject)
    return {**recorded[0].model_dump(mode="json"), "reason_code": recorded[2], "sandbox": report.sandbox,
            "event_id": await _record(request, recorded)}


@router.post("/runs/{run_id}", status_code=202, summary="Re-run a run from a stage with the same inputs, as a new run")
async def replay_run(request: Request, run_id: str, body: RunBody, who: Principal = Depends(operator)) -> dict:
    from services.audit import replay_run as rr

    _needs_more_than_commands(request, "re-running a run (it republishes a stage's trigger)")
    nats_url, dsn = _urls(request)
    try:
        return await rr.rerun(nats_url, dsn, run_id, body.from_stage, actor=who.subject, new_run_id=body.new_run_id,
                              producer="api")
    except rr.RunReplayRefused as exc:
        status = {"audit.replay_run_not_found": 404, "audit.replay_publish_refused": 403}.get(exc.reason_code, 409)
        raise _refused(exc.reason_code, exc, status) from None
