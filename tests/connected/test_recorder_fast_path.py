"""The recorder's fast path (orjson and shape checks) against decode(): the same rows for what it
accepts, and decode() still judging (and dead-lettering) what it does not."""

from __future__ import annotations

import json

import asyncpg
import pytest

from contracts import subjects
from contracts.registry import ContractError, decode, encode
from services.audit.recorder import Recorder, _fast_row
from services.common.bus import publish
from tests.factories import failed_run, successful_run

pytestmark = pytest.mark.connected


def subject_of(env):
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


_ROW = ("SELECT global_position, event_id, type, schema_version, run_id, correlation_id, causation_id, occurred_at,"
        " producer, severity, reason_code, subject, payload FROM run_events ORDER BY global_position")


async def _record(js, database, durable, *, full_decode):
    pool = await asyncpg.create_pool(database, server_settings={"role": "tuneline_app"})
    sub = await js.pull_subscribe(f"{subjects.ROOT}.>", durable=durable, stream=subjects.STREAM)
    info = await js.stream_info(subjects.STREAM)
    msgs = await sub.fetch(info.state.messages, timeout=5)
    recorder = Recorder(pool, js)
    batch = recorder.prepare(msgs, full_decode=full_decode)
    out = await recorder.commit(batch)
    async with pool.acquire() as conn:
        rows = [tuple(r) for r in await conn.fetch(_ROW)]
        skipped = [tuple(r) for r in await conn.fetch(
            "SELECT global_position, reason_code FROM run_event_skipped_positions ORDER BY 1")]
    await pool.close()
    return batch, out, rows, skipped


async def test_fast_path_records_exactly_what_decode_records(js, nats_server, database, postgres):
    envs = successful_run("run-fast", progress_steps=4) + failed_run("run-fast-2")
    for env in envs:
        await publish(js, env, subject_of(env))
    fast_batch, fast_out, fast_rows, _ = await _record(js, database, "fast", full_decode=False)
    # The same messages into a second database through decode() only.
    admin = await asyncpg.connect(postgres.url)
    await admin.execute('CREATE DATABASE "t_fast_slow"')
    await admin.close()
    from services.audit.migrate import migrate
    other = postgres.url.replace("/tuneline?", "/t_fast_slow?")
    await migrate(other)
    slow_batch, slow_out, slow_rows, _ = await _record(js, other, "slow", full_decode=True)
    assert fast_batch.fast == len(envs) and slow_batch.fast == 0
    assert fast_out.appended == slow_out.appended == len(envs)
    assert fast_rows == slow_rows


def _body(env, **changes) -> bytes:
    d = json.loads(encode(env))
    for path, value in changes.items():
        target = d
        *head, last = path.split("__")
        for k in head:
            target = target[k]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return json.dumps(d).encode()


_DROP = object()


@pytest.mark.parametrize("changes", [
    {"payload__step": "ten"},                 # wrong JSON kind at the top level of the payload
    {"payload__step": _DROP},                 # a required payload field missing (step: the one training.progress v2 requires)
    {"payload__surprise": 1},                 # an undeclared payload field (extra="forbid")
    {"schema_version": 0},                    # not the current version
    {"type": "training.nonsense"},            # not registered
    {"occurred_at": "2026-01-01T00:00:00"},   # naive timestamp
    {"occurred_at": "now"},
    {"event_id": "not-a-uuid"},
    {"severity": "fatal"},
    {"reason_code": "made.up"},
    {"run_id": ""},
    {"extra_key": 1},
])
def test_fast_path_declines_what_it_cannot_vouch_for(changes):
    progress = successful_run("run-x", progress_steps=1)[4]
    assert progress.type == "training.progress"
    assert _fast_row(1, "s", encode(progress)) is not None
    assert _fast_row(1, "s", _body(progress, **changes)) is None


def test_fast_path_declines_garbage():
    assert _fast_row(1, "s", b"\x00garbage") is None
    assert _fast_row(1, "s", b"[1, 2]") is None
    assert _fast_row(1, "s", b'{"a": NaN}') is None


async def test_a_payload_the_fast_path_declines_is_judged_by_decode_and_dead_lettered(js, nats_server, database):
    good = successful_run("run-inv", progress_steps=1)
    bad = good[4]
    for env in good[:4]:
        await publish(js, env, subject_of(env))
    await js.publish(subject_of(bad), _body(bad, payload__step="ten"), headers={"Nats-Msg-Id": "bad-step"})
    batch, out, rows, skipped = await _record(js, database, "inv", full_decode=False)
    assert batch.fast == 4 and out.appended == 4 and out.dead_lettered == 1
    assert skipped == [(5, "bus.invalid_payload")]


def _nested(env, depth: int) -> bytes:
    """The run.start with a recipe override nested `depth` lists deep (a dict[str, Any] takes any JSON)."""
    marker = '"__nested__"'
    text = _body(env, payload__plan={**env.payload["plan"], "recipe_overrides": {"x": "__nested__"}}).decode()
    return text.replace(marker, "[" * depth + "]" * depth).encode()


def test_fast_path_declines_json_nested_deeper_than_decode_reads():
    """pydantic's parser (decode()) reads about 200 levels, orjson 1024 and writes 254: the fast path
    recorded a message decode() refuses (and that every service dead-letters), and raised on a deeper
    one, which stopped the recorder (and the audit service) on every start."""
    start = successful_run("run-x")[0]
    assert _fast_row(1, "s", _nested(start, 150)) is not None
    for depth in (250, 600):
        with pytest.raises(ContractError):
            decode(_nested(start, depth))
        assert _fast_row(1, "s", _nested(start, depth)) is None


async def test_json_nested_too_deep_is_dead_lettered_and_recording_goes_on(js, nats_server, database):
    """Also nested beyond json.loads' recursion limit, which the dead letter's attribution raised on: the
    batch was retried forever and nothing after it was recorded."""
    good = successful_run("run-deep", progress_steps=1)
    await publish(js, good[0], subject_of(good[0]))
    for i, depth in enumerate((600, 5000)):
        await js.publish(subject_of(good[0]), _nested(good[0], depth), headers={"Nats-Msg-Id": f"deep-{i}"})
    for env in good[1:3]:
        await publish(js, env, subject_of(env))
    batch, out, rows, skipped = await _record(js, database, "deep", full_decode=False)
    assert out.appended == 3 and out.dead_lettered == 2
    assert skipped == [(2, "bus.malformed_message"), (3, "bus.malformed_message")]


def test_fast_path_declines_an_integer_beyond_64_bits():
    """orjson would read it as a rounded float: decode() keeps it exact."""
    committed = successful_run("run-x")[1]
    assert committed.type == "ingest.committed"
    assert _fast_row(1, "s", _body(committed, payload__rejected_by_reason={"ingest.empty_text": 2**70})) is None


async def test_an_integer_beyond_64_bits_is_recorded_exactly(js, nats_server, database):
    good = successful_run("run-big", progress_steps=1)
    big = good[1].model_copy(update={"payload": {**good[1].payload, "rejected_by_reason": {"ingest.empty_text": 2**70}}})
    for env in [good[0], big]:
        await publish(js, env, subject_of(env))
    batch, out, rows, _ = await _record(js, database, "big", full_decode=False)
    assert (batch.fast, out.appended) == (1, 2)
    assert json.loads(rows[1][-1])["rejected_by_reason"] == {"ingest.empty_text": 2**70}


def test_fast_path_declines_a_payload_whose_nested_parts_are_invalid():
    """Its checks at the top level pass, but the model refuses it: the fast path must not record what
    decode() would dead-letter (a run.start with an empty plan once stopped the timeline for good)."""
    start = successful_run("run-x")[0]
    assert start.type == "run.start" and _fast_row(1, "s", encode(start)) is not None
    assert _fast_row(1, "s", _body(start, payload__plan={})) is None
    done = next(e for e in successful_run("run-x") if e.type == "eval.completed")
    assert _fast_row(1, "s", _body(done, payload__candidate={"accuracy": "high"})) is None


async def test_a_run_start_with_an_invalid_plan_is_dead_lettered_not_recorded(js, nats_server, database):
    good = successful_run("run-plan", progress_steps=1)
    await js.publish(subject_of(good[0]), _body(good[0], payload__plan={}), headers={"Nats-Msg-Id": "bad-plan"})
    for env in good[1:3]:
        await publish(js, env, subject_of(env))
    batch, out, rows, skipped = await _record(js, database, "plan", full_decode=False)
    assert out.appended == 2 and out.dead_lettered == 1
    assert skipped == [(1, "bus.invalid_payload")]


def test_a_validator_the_json_schema_does_not_show_makes_the_fast_path_validate_with_the_model():
    from typing import Annotated

    from pydantic import AfterValidator, BaseModel

    from services.audit.recorder import _has_python_validator

    class Flat(BaseModel):
        step: int

    class Checked(BaseModel):
        locator: Annotated[str, AfterValidator(lambda v: v)]

    assert Checked.model_json_schema()["properties"]["locator"] == {"title": "Locator", "type": "string"}
    assert _has_python_validator(Checked.__pydantic_core_schema__)
    assert not _has_python_validator(Flat.__pydantic_core_schema__)
