"""Registry service: `export.completed` -> `registry.version_registered` (a candidate) on the target's
own subject, appended with an expected last sequence so concurrent writers cannot both win (D7).

`append_registration` is that append; `tuneline import openai-jobs --target` uses it too, for
`registry.hosted_version_registered` (a version trained on a hosted provider outside the pipeline), which
counts in the target's version sequence like any registration."""

from __future__ import annotations

from collections.abc import Callable

from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.envelope import Envelope
from contracts.events import RegistryFailed, VersionRegistered
from contracts.registry import ContractError, decode
from services.common.app import Service
from services.common.bus import ExpectedSequenceMismatch, publish
from services.common.delivery import ConsumerSpec, StageContext, StageError
from services.common.logging import get_logger
from services.registry.domain import next_version
from services.registry.settings import RegistrySettings

log = get_logger(__name__)

EXPORTED = ConsumerSpec(service="registry", durable="registry-export-completed",
                        subject=subjects.subject_for("export.completed", kind="event"),
                        accepts=("export.completed",), failure_type=RegistryFailed, stage="registry")

MAX_ATTEMPTS = 5
# The event types that register a version of a target (and so number the target's versions).
REGISTRATIONS = ("registry.version_registered", "registry.hosted_version_registered")


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
    await append_registration(ctx.js, target, str(ctx.envelope.event_id), lambda version: ctx.envelope_for(
        VersionRegistered(target=target, version=version, export=p.export, base_model=p.base_model,
                          candidate=p.candidate, base=p.base, source_run_id=ctx.envelope.run_id)))


def build(settings: RegistrySettings | None = None) -> Service:
    svc = Service("registry", settings or RegistrySettings())
    svc.consume(EXPORTED, on_exported)
    return svc


def main() -> None:
    build().run()
