"""Delivery semantics against a real nats-server: dedup, redelivery, dead letters (D3, D4)."""

from __future__ import annotations

import json
import uuid

import pytest

from contracts import subjects
from contracts.commands import StartRun
from contracts.events import IngestCommitted, IngestFailed
from contracts.registry import decode, encode
from services.common.app import Service
from services.common.bus import publish
from services.common.delivery import ConsumerSpec, StageError
from services.common.settings import ServiceSettings
from tests.conftest import wait_for
from tests.factories import envelope, plan, ref

pytestmark = pytest.mark.connected

SPEC = ConsumerSpec(service="ingest", durable="ingest-test", subject=subjects.subject_for("run.start", kind="command"),
                    accepts=("run.start",), failure_type=IngestFailed, stage="ingest")


def start_command(run_id="run-1"):
    return envelope(StartRun(plan=plan()), run_id=run_id, producer="cli")


async def started_service(nats_server, tmp_path, handler, **overrides):
    settings = ServiceSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", max_deliver=3,
                               nack_backoff_s=(0.05,), ack_wait_s=5, **overrides)
    svc = Service("ingest", settings)
    svc.consume(SPEC, handler)
    await svc.prepare_broker()
    await svc.broker.start()
    return svc


async def stream_messages(js, stream, subject=None):
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        if subject is None or msg.subject == subject:
            out.append(msg)
    return out


async def events_of_type(js, type_name):
    msgs = await stream_messages(js, subjects.STREAM, subjects.subject_for(type_name, kind="event"))
    return [decode(m.data)[0] for m in msgs]


async def test_publishing_the_same_event_twice_stores_it_once(js):
    env = start_command()
    subject = subjects.subject_for("run.start", kind="command")
    first = await publish(js, env, subject)
    second = await publish(js, env, subject)
    assert not first.duplicate and second.duplicate
    assert second.seq == first.seq
    assert (await js.stream_info(subjects.STREAM)).state.messages == 1


async def test_an_event_its_headers_take_over_max_payload_is_refused_and_the_connection_stays(js):
    """nats-py checks the payload alone against max_payload: the message went out, and the server closed
    the connection for it (every subscription and publish of the service with it)."""
    from services.common.bus import PublishError

    env = envelope(IngestFailed(stage="ingest", message="", trigger_type="run.start"), run_id="run-big")
    room = js._nc.max_payload - len(encode(env))
    big = env.model_copy(update={"payload": {**env.payload, "message": "m" * (room - 20)}})
    assert len(encode(big)) == js._nc.max_payload - 20  # nats-py sends it; its Nats-Msg-Id header is longer than 20
    with pytest.raises(PublishError, match="max_payload"):
        await publish(js, big, subjects.subject_for(big.type, kind="event"))
    await publish(js, start_command(), subjects.subject_for("run.start", kind="command"))  # still connected
    assert (await js.stream_info(subjects.STREAM)).state.messages == 1


async def test_handler_crash_is_redelivered_and_its_event_published_once(js, nats_server, tmp_path):
    calls = []

    async def handler(ctx):
        calls.append(ctx.raw.metadata.num_delivered)
        await ctx.emit(IngestCommitted(plan=ctx.payload.plan, dataset=ref("d"), rejected=ref("r"), rows_read=1,
                                       rows_accepted=1, rows_rejected=0, rejected_by_reason={}))
        if len(calls) == 1:
            raise RuntimeError("crash after publishing, before the ack")

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        await publish(js, start_command(), SPEC.subject)
        await wait_for(lambda: len(calls) >= 2)
        committed = await wait_for(lambda: events_of_type(js, "ingest.committed"))
        consumer = await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert calls == [1, 2]
    assert len(committed) == 1  # the redelivered handler re-published the same deterministic id
    assert consumer.num_ack_pending == 0 and consumer.num_pending == 0


async def _settled(js, durable):
    info = await js.consumer_info(subjects.STREAM, durable)
    return info if info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.stream_seq > 0 else None


async def test_poison_message_reaches_the_dlq_after_max_deliver_with_a_failure_event(js, nats_server, tmp_path):
    calls = []

    async def handler(ctx):
        calls.append(ctx.raw.metadata.num_delivered)
        raise ValueError("always broken")

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        cmd = start_command("run-poison")
        await publish(js, cmd, SPEC.subject)
        dead = await wait_for(lambda: events_of_type(js, "bus.message_dead_lettered"))
        dlq = await wait_for(lambda: stream_messages(js, subjects.DLQ_STREAM))
        await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert calls == [1, 2, 3]  # bounded: max_deliver=3, then no more attempts
    assert dead[0].reason_code == "bus.delivery_exhausted"
    assert dead[0].run_id == "run-poison" and dead[0].causation_id == cmd.event_id
    assert "always broken" in dead[0].payload["error"]
    assert len(dlq) == 1 and decode(dlq[0].data)[0].event_id == cmd.event_id
    assert dlq[0].headers["Tuneline-Reason-Code"] == "bus.delivery_exhausted"


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "bus.malformed_message"),
        (b"\xff\xfe\x00binary", "bus.malformed_message"),
        (json.dumps({"type": "run.start", "run_id": "run-x"}).encode(), "bus.malformed_message"),
        (None, "bus.unknown_event_type"),
        ("bad-payload", "bus.invalid_payload"),
        # What json.loads cannot read while attributing the failure event (nested past its recursion limit,
        # an integer past Python's digit limit) or a run id no envelope can carry (a lone surrogate): the
        # dead letter raised, the message stayed unsettled and came back, failing the same way, forever.
        (b'{"run_id": "run-deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "bus.malformed_message"),
        (b'{"run_id": "run-long", "x": ' + b"1" * 5000 + b"}", "bus.malformed_message"),
        (b'{"run_id": "run-\\ud800", "type": "run.start"}', "bus.malformed_message"),
    ],
)
async def test_bad_input_is_dead_lettered_with_a_reason_and_never_reaches_the_handler(js, nats_server, tmp_path, body, reason):
    calls = []

    async def handler(ctx):
        calls.append(1)

    if body is None:
        raw = json.loads(encode(start_command("run-unknown")))
        raw["type"] = "run.teleport"
        body = json.dumps(raw).encode()
    elif body == "bad-payload":
        raw = json.loads(encode(start_command("run-badpayload")))
        raw["payload"] = {"plan": {"locator": "", "target": "has space"}}
        body = json.dumps(raw).encode()
    svc = await started_service(nats_server, tmp_path, handler)
    try:
        await js.publish(SPEC.subject, body, headers={"Nats-Msg-Id": str(uuid.uuid4())})
        dead = await wait_for(lambda: events_of_type(js, "bus.message_dead_lettered"))
        dlq = await wait_for(lambda: stream_messages(js, subjects.DLQ_STREAM))
        await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert calls == []
    assert dead[0].reason_code == reason
    assert dlq[0].data == body  # the dead letter keeps the original bytes for re-driving


async def test_a_message_too_large_to_copy_with_the_dead_letter_headers_is_dead_lettered_and_the_service_goes_on(
        js, nats_server, tmp_path):
    """The server took it (just under max_payload), but not its copy with the dead letter's headers: it
    closed the service's connection for it, and the service neither dead-lettered nor handled anything
    after it again (its pull loop spun on the closed connection, holding the event loop: this test hung)."""
    calls = []

    async def handler(ctx):
        calls.append(ctx.envelope.run_id)

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        limit = js._nc.max_payload
        body = b'{"run_id": "run-huge", "x": "' + b"a" * (limit - 64) + b'"}'
        await js.publish(SPEC.subject, body, headers={"Nats-Msg-Id": "huge"})
        await publish(js, start_command("run-after-huge"), SPEC.subject)
        (dead,) = await wait_for(lambda: events_of_type(js, "bus.message_dead_lettered"))
        (dlq,) = await wait_for(lambda: stream_messages(js, subjects.DLQ_STREAM))
        await wait_for(lambda: calls)
        await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert dead.reason_code == "bus.malformed_message" and dead.run_id == "run-huge"
    assert dlq.data in (b"", None) and f"{subjects.STREAM} sequence 1" in dlq.headers["Tuneline-Body-Omitted"]
    assert calls == ["run-after-huge"]


async def test_a_subject_that_is_not_utf8_does_not_deafen_the_service(js, nats_server, tmp_path):
    """nats-py decodes a subject in its read loop, which ended on one that is not UTF-8: the service (here
    a subscription like the trainer's to training commands, and its consumer) heard nothing more."""
    import socket

    calls, heard = [], []

    async def handler(ctx):
        calls.append(ctx.envelope.run_id)

    async def on_control(msg):
        heard.append(msg.subject)

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        await svc.js.subscribe(f"{subjects.COMMANDS}.training.>", cb=on_control, ordered_consumer=True)
        host, port = nats_server.url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port))) as raw:  # nats-py itself refuses to publish one
            raw.recv(4096)
            raw.sendall(b'CONNECT {"verbose":false}\r\nPUB tuneline.cmd.training.\xff 2\r\n{}\r\nPING\r\n')
            assert b"PONG" in raw.recv(4096)
        await js.publish(f"{subjects.COMMANDS}.training.cancel", b"{}", headers={"Nats-Msg-Id": "cancel"})
        await publish(js, start_command("run-after-bad-subject"), SPEC.subject)
        await wait_for(lambda: len(heard) == 2 and calls, timeout=10)
    finally:
        await svc.broker.stop()
    assert heard == ["tuneline.cmd.training.\ufffd", "tuneline.cmd.training.cancel"]
    assert calls == ["run-after-bad-subject"]


async def test_stage_error_is_answered_with_a_failure_event_and_acked(js, nats_server, tmp_path):
    async def handler(ctx):
        raise StageError("ingest.source_not_found", "jsonl:/nope.jsonl: no such file")

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        cmd = start_command("run-missing")
        await publish(js, cmd, SPEC.subject)
        failed = await wait_for(lambda: events_of_type(js, "ingest.failed"))
        await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert failed[0].reason_code == "ingest.source_not_found"
    assert failed[0].payload["message"] == "jsonl:/nope.jsonl: no such file"
    assert failed[0].causation_id == cmd.event_id and failed[0].run_id == "run-missing"
    assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 0


async def test_a_stage_error_quoting_a_huge_input_is_still_answered_with_its_failure_event(js, nats_server, tmp_path):
    """A run.start with a multi-megabyte locator: ingest's message quoted it, the failure event went over
    max_payload and was never published; the run ended in bus.delivery_exhausted, its reason lost."""
    async def handler(ctx):
        raise StageError("ingest.locator_outside_roots", f"locator {'x' * (js._nc.max_payload + 1)!r}: outside the roots")

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        await publish(js, start_command("run-long-message"), SPEC.subject)
        (failed,) = await wait_for(lambda: events_of_type(js, "ingest.failed"))
        await wait_for(lambda: _settled(js, SPEC.durable))
    finally:
        await svc.broker.stop()
    assert failed.reason_code == "ingest.locator_outside_roots" and failed.run_id == "run-long-message"
    assert failed.payload["message"].startswith("locator 'xxx") and len(failed.payload["message"]) <= 4000
    assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 0


async def test_a_message_whose_worker_dies_on_every_delivery_is_dead_lettered_not_lost(js, nats_server, tmp_path):
    """The worker never settles it (killed each time): the server keeps delivering (no server limit)
    and the delivery after the allowed number is dead-lettered with a failure event, without running
    the handler again. With the server's own max_deliver it was silently dropped."""
    from nats.js.api import AckPolicy

    from services.common.app import consumer_config
    from services.common.artifacts import ArtifactStore
    from services.common.delivery import handle_delivery

    settings = ServiceSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", max_deliver=2, ack_wait_s=1)
    config = consumer_config(settings)
    assert config.max_deliver == -1
    config.durable_name, config.ack_policy, config.filter_subject = "dies", AckPolicy.EXPLICIT, SPEC.subject
    await js.add_consumer(subjects.STREAM, config)
    sub = await js.pull_subscribe_bind("dies", stream=subjects.STREAM)
    cmd = start_command("run-dies")
    await publish(js, cmd, SPEC.subject)
    for attempt in (1, 2):  # the worker takes it and dies: no ack, no nak
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == attempt
    (msg,) = await sub.fetch(1, timeout=5)  # redelivered after ack_wait, beyond the allowed two

    async def handler(ctx):
        raise AssertionError("a delivery beyond max_deliver must not run the handler")

    outcome = await handle_delivery(msg, SPEC, handler, js, ArtifactStore(tmp_path / "a"), settings)
    assert outcome == "dead_lettered"
    (dead,) = await wait_for(lambda: events_of_type(js, "bus.message_dead_lettered"))
    assert dead.reason_code == "bus.delivery_exhausted" and dead.run_id == "run-dies"
    assert "without being settled" in dead.payload["error"]
    assert len(await stream_messages(js, subjects.DLQ_STREAM)) == 1
    info = await js.consumer_info(subjects.STREAM, "dies")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_consumer_made_with_a_server_delivery_limit_loses_it_when_the_service_starts(js, nats_server, tmp_path):
    """A stack upgraded in place: the durable exists with max_deliver 5, which the subscriber would keep."""
    from nats.js.api import ConsumerConfig

    await js.add_consumer(subjects.STREAM, ConsumerConfig(durable_name=SPEC.durable, max_deliver=5, ack_wait=5,
                                                          filter_subject=SPEC.subject))

    async def handler(ctx):
        pass

    svc = await started_service(nats_server, tmp_path, handler)
    try:
        assert (await js.consumer_info(subjects.STREAM, SPEC.durable)).config.max_deliver == -1
    finally:
        await svc.broker.stop()


def _registry_of_two_exports(js, nats_server, tmp_path):
    """The registry's handler as a function of an export.completed envelope, and two exports (runs 1 and 2)
    of one target."""
    from contracts.events import ExportCompleted
    from services.common.artifacts import ArtifactStore
    from services.common.delivery import StageContext
    from services.registry.app import on_exported

    settings = ServiceSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")
    metrics = {"accuracy": 0.9, "macro_f1": 0.9, "n": 10}
    exports = [envelope(ExportCompleted(plan=plan(), export=ref(f"e{i}"), files={"adapter_model.safetensors": "0" * 64},
                                        format="peft-lora-safetensors",
                                        base_model="m", candidate=metrics, base=metrics), run_id=f"run-{i}", producer="export")
               for i in (1, 2)]

    async def register(env):
        _, payload = decode(encode(env))
        await on_exported(StageContext(env, payload, "registry", js, ArtifactStore(tmp_path / "a"), settings, None))

    return register, exports


async def test_a_redelivered_export_is_not_registered_again_after_another_run_registered(js, nats_server, tmp_path):
    """Only the target's last event was checked: a redelivery arriving after another run's version (and
    past the duplicate window) registered a second version of the same export."""
    register, exports = _registry_of_two_exports(js, nats_server, tmp_path)

    import asyncio

    config = (await js.stream_info(subjects.STREAM)).config
    await js.update_stream(config.evolve(duplicate_window=0.5))  # so that the redelivery comes "past the window"
    await register(exports[0])
    await register(exports[1])
    await asyncio.sleep(1.0)
    await register(exports[0])  # the first export again: nothing new
    registered = await events_of_type_on(js, "tuneline.evt.registry.>")
    assert [(e.payload["source_run_id"], e.payload["version"]) for e in registered] == [("run-1", 1), ("run-2", 2)]


async def test_a_foreign_message_on_a_targets_subject_does_not_stop_its_registrations(js, nats_server, tmp_path):
    """The target's last message was read as its last registration (and every message as a registration
    while looking for a redelivery's): one malformed message there failed every later registration of the
    target until bus.delivery_exhausted, for good."""
    register, exports = _registry_of_two_exports(js, nats_server, tmp_path)
    target_subject = subjects.subject_for("registry.version_registered", kind="event", target=plan().target)

    await js.publish(target_subject, b'{"garbage": true}', headers={"Nats-Msg-Id": "garbage-1"})
    await register(exports[0])
    await js.publish(target_subject, encode(start_command("run-x")), headers={"Nats-Msg-Id": "foreign-1"})
    await register(exports[1])
    await register(exports[0])  # a redelivery: still registered once
    registered = [decode(m.data)[0] for m in await stream_messages(js, subjects.STREAM, target_subject)
                  if m.headers.get("Nats-Msg-Id") not in ("garbage-1", "foreign-1")]
    assert [(e.payload["source_run_id"], e.payload["version"]) for e in registered] == [("run-1", 1), ("run-2", 2)]


async def events_of_type_on(js, subject_filter):
    from nats.js.errors import NotFoundError

    out, seq = [], 1
    while True:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=subject_filter, next=True)
        except NotFoundError:
            return out
        out.append(decode(msg.data)[0])
        seq = msg.seq + 1


@pytest.mark.parametrize("replayed", [True, False])
async def test_a_delivery_beyond_the_limit_replays_a_recorded_outcome_before_dead_lettering(js, nats_server, tmp_path,
                                                                                           replayed):
    """The trainer's last allowed delivery recorded its completed job and died before settling: the
    consumer's replay publishes that outcome and acks; with nothing to replay it is dead-lettered."""
    from nats.js.api import AckPolicy

    from services.common.app import consumer_config
    from services.common.artifacts import ArtifactStore
    from services.common.delivery import handle_delivery

    settings = ServiceSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", max_deliver=1, ack_wait_s=1)
    config = consumer_config(settings)
    config.durable_name, config.ack_policy, config.filter_subject = "replay", AckPolicy.EXPLICIT, SPEC.subject
    await js.add_consumer(subjects.STREAM, config)
    sub = await js.pull_subscribe_bind("replay", stream=subjects.STREAM)
    await publish(js, start_command("run-replay"), SPEC.subject)
    await sub.fetch(1, timeout=5)  # the one allowed delivery dies
    (msg,) = await sub.fetch(1, timeout=5)
    calls = []

    async def replay(ctx):
        calls.append(ctx.envelope.run_id)
        return replayed

    async def handler(ctx):
        raise AssertionError("not run again")

    outcome = await handle_delivery(msg, SPEC, handler, js, ArtifactStore(tmp_path / "a"), settings, replay)
    assert calls == ["run-replay"]
    assert outcome == ("replayed" if replayed else "dead_lettered")
    assert len(await events_of_type(js, "bus.message_dead_lettered")) == (0 if replayed else 1)
