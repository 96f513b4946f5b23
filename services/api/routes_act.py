"""The API's acting side: every action is a command on the bus with the token's subject as its actor;
the answer is the owning service's event (or 202 with the command id when the caller does not wait).
A body that fails validation, or a caller without the role, publishes nothing."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.commands import (CancelTraining, PauseTraining, PromoteVersion, RejectVersion, RestoreVersion,
                                ResumeTraining, RollBackTarget, SetRollout, StartRun)
from contracts.common import RunPlan
from services.api import actions, reads
from services.api.auth import Principal, approver, operator
from services.common import history

router = APIRouter(prefix="/api", tags=["act"])

Wait = Annotated[bool, Query(description="wait for the owning service's answer (else 202 with the command id)")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartRunBody(Body):
    plan: RunPlan


class TrainingBody(Body):
    reason: str | None = Field(None, max_length=500)


class VersionBody(Body):
    version: str = Field(min_length=1, max_length=128, description="N, vN, or the run id that produced it")
    reason: str = Field(min_length=1, max_length=500)
    expected_sequence: int | None = Field(None, ge=0, description="the target's log sequence the caller decided on")


class PromoteBody(VersionBody):
    override: bool = False


class TargetBody(Body):
    reason: str = Field(min_length=1, max_length=500)
    expected_sequence: int | None = Field(None, ge=0)


class RolloutBody(Body):
    percent: int = Field(ge=0, le=100)
    reason: str = Field("staged rollout", min_length=1, max_length=500)
    expected_sequence: int | None = Field(None, ge=0)


class Accepted(BaseModel):
    command_id: str
    run_id: str
    event: dict | None = None


def _command(make):
    """Build the contract command; its own validation (a target's spelling, one-line reasons) is a 422 too."""
    try:
        return make()
    except ValidationError as exc:
        raise HTTPException(422, [{"loc": ["body", *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
                                  for e in exc.errors()]) from None


async def _recorded(request: Request, event_id: str, timeout: float = 5.0, *, projected: bool = False) -> bool:
    """Read-your-writes: wait (bounded) until the recorder has stored the answer, and with `projected` until
    the History projection has read past it, so a page reloaded after the action shows it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with request.app.state.pool.acquire() as conn:
        while True:
            position = await conn.fetchval("SELECT global_position FROM run_events WHERE event_id = $1::uuid", event_id)
            if position is not None and (not projected or await conn.fetchval(
                    "SELECT position >= $1 FROM projection_checkpoints WHERE projection = $2", position,
                    history.PROJECTION)):
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)


def _answer(sent: actions.Sent) -> JSONResponse:
    if sent.answer is None:
        return JSONResponse({"command_id": sent.command_id, "run_id": sent.run_id, "event": None}, status_code=202)
    ev = sent.answer
    if ev["type"] == "registry.command_refused" or (ev.get("reason_code") and ev["type"].endswith(".failed")):
        return JSONResponse({"command_id": sent.command_id, "run_id": sent.run_id, "event": ev,
                             "reason_code": ev.get("reason_code"),
                             "detail": (ev.get("payload") or {}).get("message") or ev["type"]}, status_code=409)
    return JSONResponse({"command_id": sent.command_id, "run_id": sent.run_id, "event": ev})


async def _send(request: Request, cmd, *, run_id=None, run_prefix="run", wait: bool) -> JSONResponse:
    app = request.app
    sent = await actions.send(app.state.js, cmd, run_id=run_id, run_prefix=run_prefix, wait=wait,
                              timeout=app.state.settings.answer_timeout_s)
    if sent.answer is not None:
        await _recorded(request, sent.answer["event_id"], projected=run_prefix == "registry")
    return _answer(sent)


@router.post("/runs", status_code=202, response_model=Accepted, summary="Start a run (run.start)")
async def start_run(request: Request, body: StartRunBody, who: Principal = Depends(operator)):
    cmd = _command(lambda: StartRun(plan=body.plan, requested_by=who.subject))
    return await _send(request, cmd, wait=False)


@router.post("/runs/{run_id}/training/{action}", response_model=Accepted,
             summary="Cancel, pause or resume a run's training (training.cancel/pause/resume)")
async def training_control(request: Request, run_id: str, action: Literal["cancel", "pause", "resume"],
                           body: TrainingBody, wait: Wait = False, who: Principal = Depends(operator)):
    async with request.app.state.pool.acquire() as conn:
        if not await reads.run_exists(conn, run_id):
            raise HTTPException(404, f"no run {run_id} is recorded: nothing sent")
    cls = {"cancel": CancelTraining, "pause": PauseTraining, "resume": ResumeTraining}[action]
    cmd = _command(lambda: cls(requested_by=who.subject, reason=body.reason))
    return await _send(request, cmd, run_id=run_id, wait=wait)


async def _target_known(request: Request, target: str) -> None:
    async with request.app.state.pool.acquire() as conn:
        if not await reads.target_known(conn, target):
            raise HTTPException(404, f"no target {target}: nothing sent")


def _registry_route(path: str, summary: str):
    return router.post(f"/targets/{{target}}/{path}", response_model=Accepted, summary=summary,
                       responses={409: {"description": "refused by the registry (reason code and message)"}})


async def _to_registry(request: Request, target: str, make, wait: bool) -> JSONResponse:
    """A registry command on `target` (`make` builds it): validated, the target known, then sent in a run of
    its own."""
    cmd = _command(make)
    await _target_known(request, target)
    return await _send(request, cmd, run_prefix="registry", wait=wait)


@_registry_route("promote", "Make a version production (registry.promote)")
async def promote(request: Request, target: str, body: PromoteBody, wait: Wait = True,
                  who: Principal = Depends(approver)):
    return await _to_registry(request, target, lambda: PromoteVersion(
        target=target, version=body.version, reason=body.reason, actor=who.subject, override=body.override,
        expected_sequence=body.expected_sequence), wait)


@_registry_route("reject", "Reject a version (registry.reject)")
async def reject(request: Request, target: str, body: VersionBody, wait: Wait = True,
                 who: Principal = Depends(approver)):
    return await _to_registry(request, target, lambda: RejectVersion(
        target=target, version=body.version, reason=body.reason, actor=who.subject,
        expected_sequence=body.expected_sequence), wait)


@_registry_route("rollback", "Production goes back to the previous production version (registry.rollback)")
async def rollback(request: Request, target: str, body: TargetBody, wait: Wait = True,
                   who: Principal = Depends(approver)):
    return await _to_registry(request, target, lambda: RollBackTarget(
        target=target, reason=body.reason, actor=who.subject, expected_sequence=body.expected_sequence), wait)


@_registry_route("restore", "An archived version becomes production again (registry.restore)")
async def restore(request: Request, target: str, body: VersionBody, wait: Wait = True,
                  who: Principal = Depends(approver)):
    return await _to_registry(request, target, lambda: RestoreVersion(
        target=target, version=body.version, reason=body.reason, actor=who.subject,
        expected_sequence=body.expected_sequence), wait)


@_registry_route("rollout", "The staged rollout percentage of the production version (registry.set_rollout)")
async def set_rollout(request: Request, target: str, body: RolloutBody, wait: Wait = True,
                      who: Principal = Depends(approver)):
    return await _to_registry(request, target, lambda: SetRollout(
        target=target, percent=body.percent, reason=body.reason, actor=who.subject,
        expected_sequence=body.expected_sequence), wait)
