"""Registry service: the per-target aggregate (D7).

- `export.completed` -> `registry.version_registered` (a candidate, its base model pinned) on the target's
  own subject, then the gate's verdict: `registry.validated` or `registry.rejected` (its failed criteria),
  then, when the registry's auto_promote policy names the target, `registry.promoted`.
- `registry.promote|reject|rollback|restore|set_rollout` commands -> one event on the target's subject, or
  `registry.command_refused` with a reason code (the target unchanged).

Every append expects the target's last subject sequence: a command decided on a state that another append
changed is refused with registry.conflict and the current state, so N racing commands have one winner.
A promotion or restore is smoke-checked first (services/registry/smoke.py). After each append the
`serving` bucket is updated from the log (services/registry/serving.py).

`append_registration` is the registration's append; `tuneline import openai-jobs --target` uses it too, for
`registry.hosted_version_registered` (a version trained on a hosted provider outside the pipeline), which
counts in the target's version sequence like any registration."""

from __future__ import annotations

from collections.abc import Callable

from nats.js.errors import NotFoundError

import asyncio

from contracts import subjects
from contracts.envelope import Envelope, Severity
from contracts.events import RegistryCommandRefused, RegistryFailed, SmokeCheck, VersionRegistered
from contracts.registry import ContractError, decode
from services.common.app import Service
from services.common.bus import ExpectedSequenceMismatch, publish
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.logging import get_logger
from services.registry import domain, serving
from services.registry.domain import REGISTRATIONS, Decision, TargetState, next_version
from services.registry.log import read_target
from services.registry.settings import RegistrySettings
from services.registry.smoke import SmokeFailed, pin_base_model, smoke_check

log = get_logger(__name__)

EXPORTED = ConsumerSpec(service="registry", durable="registry-export-completed",
                        subject=subjects.subject_for("export.completed", kind="event"),
                        accepts=("export.completed",), failure_type=RegistryFailed, stage="registry")

COMMAND_TYPES = ("registry.promote", "registry.reject", "registry.rollback", "registry.restore",
                 "registry.set_rollout")
COMMANDS = ConsumerSpec(service="registry", durable="registry-commands", subject=f"{subjects.COMMANDS}.registry.>",
                        accepts=COMMAND_TYPES, failure_type=RegistryFailed, stage="registry")

MAX_ATTEMPTS = 5


async def last_target_sequence(js, target_filter: str) -> int:
    """The stream sequence of the target's last message (0 when the target is new): what the next
    registration expects, whatever that message is (the server compares sequences, not contents)."""
    try:
        msg = await js.get_last_msg(subjects.STREAM, target_filter)
    except NotFoundError:
        return 0
    return msg.seq


def registry_event(data: bytes, target: str) -> dict | None:
    """The message as a registration of `target`, or None. Anyone on the bus may publish on the target's
    subjects (malformed JSON, another type): the recorder dead-letters such a message, and the aggregate
    is not built from it either. One such message, read as the last registration, failed every later
    registration of the target until bus.delivery_exhausted."""
    try:
        env, payload = decode(data)
    except ContractError:
        return None
    if env.type not in REGISTRATIONS or payload.target != target:
        return None
    return env.model_dump(mode="json")


async def scan_target(js, target_filter: str, target: str, trigger_id: str, first_seq: int,
                      last_seq: int) -> tuple[dict | None, dict | None]:
    """The target's registrations at stream positions first_seq..last_seq: (the one caused by
    `trigger_id`, if any; the last one, if any).

    The last registration alone is not enough: a redelivered export.completed (its ack lost, a retrained
    run) may come after another run registered, and past the stream's duplicate window; registering it
    again would make a version the audit log refuses as a duplicate of the first (same event id)."""
    seq, last = first_seq, None
    while seq <= last_seq:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=target_filter, next=True)
        except NotFoundError:
            break
        if msg.seq > last_seq:
            break
        event = registry_event(msg.data, target)
        if event is not None:
            if event.get("causation_id") == trigger_id:
                return event, event
            last = event
        seq = msg.seq + 1
    return None, last


async def append_registration(js, target: str, trigger: str, make_envelope: Callable[[int], Envelope]) -> int:
    """Append the registration `make_envelope(version)` to the target's log unless the event `trigger` already
    caused one; returns the version registered (now or before). The next version follows the target's last
    registration; the append expects the target's last sequence, and a conflict reads the newer events and
    tries again (D7)."""
    target_filter = subjects.registry_target_filter(target)
    scanned, last = 0, None  # the target's events up to `scanned` were looked through: a retry looks only at newer ones
    for attempt in range(1, MAX_ATTEMPTS + 1):
        seq = await last_target_sequence(js, target_filter)
        done, newer = await scan_target(js, target_filter, target, trigger, scanned + 1, seq)
        scanned, last = seq, newer or last
        if done is not None:
            log.info("already_registered", version=done["payload"]["version"])  # a redelivery after success
            return int(done["payload"]["version"])
        env = make_envelope(next_version(last))
        try:
            await publish(js, env, subjects.subject_for(env.type, kind="event", target=target),
                          expected_last_subject_seq=seq, expected_subject_filter=target_filter)
            return int(env.payload["version"])
        except ExpectedSequenceMismatch:
            log.warning("registry_concurrent_update", attempt=attempt, reason_code="registry.concurrent_update")
    raise RuntimeError(f"target {target}: {MAX_ATTEMPTS} concurrent-update conflicts in a row")


async def on_exported(ctx: StageContext) -> None:
    p = ctx.payload
    target = p.plan.target
    if not subjects.is_subject_token(target):
        raise StageError("registry.invalid_target", f"target {target!r} is not a valid subject token")
    pin = await asyncio.to_thread(pin_base_model, p.base_model)  # hashes the base's weights: off the loop
    version = await append_registration(ctx.js, target, str(ctx.envelope.event_id), lambda version: ctx.envelope_for(
        VersionRegistered(target=target, version=version, export=p.export, base_model=p.base_model,
                          candidate=p.candidate, base=p.base, source_run_id=ctx.envelope.run_id, base_model_pin=pin,
                          gate=p.gate, records=p.records, test=p.test, test_set_sha256=p.test_set_sha256,
                          label_space=p.label_space, dataset_version=p.dataset_version, manifest=p.manifest)))
    await settle_registration(ctx, target, version)


async def settle_registration(ctx: StageContext, target: str, version: int) -> None:
    """After a registration: the gate's verdict (validated / rejected), then the auto_promote policy. The
    registry's own acts: on a lost race it reads the log again and decides anew (a redelivery finds them
    done and appends nothing)."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        state = await read_target(ctx.js, target)
        verdict = domain.gate_decision(state, version)
        if verdict is None:
            break
        if await _append(ctx, state, ctx.envelope_for(verdict, step=f"/v{version}")) is not None:
            break
    else:
        raise RuntimeError(f"target {target}: {MAX_ATTEMPTS} conflicts deciding v{version}'s gate verdict")
    if not getattr(ctx.settings, "auto_promotes", lambda _target: False)(target):
        return
    for attempt in range(1, MAX_ATTEMPTS + 1):
        state = await read_target(ctx.js, target)
        decision = domain.auto_promotion(state, version)
        if decision is None or (state.production is not None and state.production.version > version):
            return  # not validated, already promoted, or a newer version serves already
        smoke, refusal = await _smoke(ctx, state, decision)
        if refusal is not None:
            await _refuse(ctx, state, "auto_promote", str(version), "registry:auto_promote", refusal, smoke,
                          step=f"/auto/v{version}")
            return
        event = decision.event.model_copy(update={"smoke": smoke})
        if await _append(ctx, state, ctx.envelope_for(event, step=f"/auto/v{version}")) is not None:
            return
    raise RuntimeError(f"target {target}: {MAX_ATTEMPTS} conflicts auto-promoting v{version}")


async def on_command(ctx: StageContext) -> None:
    """A registry command: one event on the target's log, or a refusal that leaves the target unchanged."""
    cmd, command_type, command_id = ctx.payload, ctx.envelope.type, str(ctx.envelope.event_id)
    state = await read_target(ctx.js, cmd.target)
    version_ref = getattr(cmd, "version", None)
    if command_id in state.commands:
        log.info("command_already_applied", event_type=state.commands[command_id])  # a redelivery
        await serving.project(ctx.js, state)
        return
    if cmd.expected_sequence is not None and cmd.expected_sequence != state.last_sequence:
        await _refuse(ctx, state, command_type, version_ref, cmd.actor, _conflict(state, cmd.expected_sequence))
        return
    decision = domain.decide(state, command_type, cmd, command_id)
    if decision.refusal is not None:
        refusal = decision.refusal
        if refusal.reason_code == "registry.version_not_found" and version_ref:
            refusal = await _on_other_target(ctx.js, cmd.target, version_ref) or refusal
        await _refuse(ctx, state, command_type, version_ref, cmd.actor, refusal)
        return
    smoke, refusal = await _smoke(ctx, state, decision)
    if refusal is not None:
        await _refuse(ctx, state, command_type, version_ref, cmd.actor, refusal, smoke)
        return
    event = decision.event.model_copy(update={"smoke": smoke}) if decision.smoke_version is not None else decision.event
    if await _append(ctx, state, ctx.envelope_for(event)) is None:
        now = await read_target(ctx.js, cmd.target)
        await _refuse(ctx, now, command_type, version_ref, cmd.actor, _conflict(now, state.last_sequence))


def _conflict(state: TargetState, decided_at: int) -> domain.Refusal:
    return domain.Refusal("registry.conflict", f"target {state.target} changed since sequence {decided_at} (now "
                                               f"{state.last_sequence}): nothing appended; decide again on the state below")


async def _append(ctx: StageContext, state: TargetState, env: Envelope) -> TargetState | None:
    """Append `env` to the target's log expecting the state's last sequence, then project `serving`;
    None when another append came first (nothing was appended)."""
    target = state.target
    try:
        ack = await publish(ctx.js, env, subjects.subject_for(env.type, kind="event", target=target),
                            expected_last_subject_seq=state.last_sequence,
                            expected_subject_filter=subjects.registry_target_filter(target))
    except ExpectedSequenceMismatch:
        log.warning("registry_conflict", target=target, expected=state.last_sequence, reason_code="registry.conflict")
        return None
    log.info("registry_appended", emitted_type=env.type, target=target, seq=ack.seq)
    new = domain.apply(state, {**env.model_dump(mode="json")}, ack.seq)
    await serving.project(ctx.js, new)
    return new


async def _smoke(ctx: StageContext, state: TargetState, decision: Decision) -> tuple[SmokeCheck | None, domain.Refusal | None]:
    """The smoke check a promotion or restore needs: (its result, a refusal when it failed)."""
    if decision.smoke_version is None:
        return None, None
    version = state.versions[decision.smoke_version]
    if not ctx.settings.smoke:
        return SmokeCheck(rows=0, matched=0, passed=True, skipped="smoke check disabled (TUNELINE_REGISTRY_SMOKE)"), None
    if version.registration_type == "registry.hosted_version_registered":
        return SmokeCheck(rows=0, matched=0, passed=True, skipped="hosted model: no local artifact to load"), None
    try:
        async with ctx.keep_alive():
            result = await asyncio.to_thread(smoke_check, ctx.artifacts, version.registered, ctx.settings.smoke_rows)
    except SmokeFailed as exc:
        return None, domain.Refusal("registry.smoke_failed", f"v{version.number} of {state.target}: {exc}")
    if not result.passed:
        return result, domain.Refusal(
            "registry.smoke_failed", f"v{version.number} of {state.target}: {result.rows - result.matched} of "
                                     f"{result.rows} test rows answered differently from the evaluator's records "
                                     f"({', '.join(result.mismatched_row_ids[:5])})")
    return result, None


async def _refuse(ctx: StageContext, state: TargetState, command: str, version: str | None, actor: str,
                  refusal: domain.Refusal, smoke: SmokeCheck | None = None, step: str = "") -> None:
    log.info("registry_refused", reason_code=refusal.reason_code, target=state.target, command=command)
    await ctx.emit(RegistryCommandRefused(command=command, target=state.target, version=version, actor=actor,
                                          message=refusal.message[:2000], state=state.summary(), smoke=smoke),
                   step=step, severity=Severity.WARNING, reason_code=refusal.reason_code)


async def _on_other_target(js, target: str, ref: str) -> domain.Refusal | None:
    """A run id registered on another target than the one named (the refusal says which)."""
    seq = 1
    while True:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=f"{subjects.EVENTS}.registry.*.version_registered",
                                   next=True, direct=True)
        except NotFoundError:
            return None
        try:
            env, payload = decode(msg.data)
        except ContractError:
            env = payload = None
        if payload is not None and getattr(payload, "source_run_id", None) == ref and payload.target != target:
            return domain.Refusal("registry.version_of_other_target",
                                  f"run {ref} is v{payload.version} of target {payload.target}, not of {target}")
        seq = msg.seq + 1


def build(settings: RegistrySettings | None = None) -> Service:
    svc = Service("registry", settings or RegistrySettings())
    svc.consume(EXPORTED, on_exported)
    svc.consume(COMMANDS, on_command)
    return svc


def main() -> None:
    build().run()
