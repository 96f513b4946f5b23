"""The registry against a real nats-server (and PostgreSQL for the point-in-time answers): registration and
the gate's verdict, the commands and their refusals, racing commands with one winner, the serving bucket."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import pytest

from contracts import subjects
from contracts.commands import PromoteVersion, RejectVersion, RestoreVersion, RollBackTarget, SetRollout
from contracts.envelope import Envelope
from contracts.events import ClassificationMetrics, ExportCompleted, GateVerdict, Notice
from contracts.registry import message_type_of
from services.cli.registry_cmds import Refused, send, serving_at
from services.common.bus import publish
from services.registry import serving
from services.registry.app import build
from services.registry.log import read_target, target_events
from services.registry.settings import RegistrySettings
from tests.conftest import wait_for
from tests.factories import envelope, plan, ref

pytestmark = pytest.mark.connected

M = ClassificationMetrics(accuracy=0.9, macro_f1=0.9, n=100)


def export_completed(run_id: str, target: str, passed: bool | None) -> Envelope:
    gate = None if passed is None else GateVerdict(
        event_id=str(uuid.uuid4()), passed=passed, n=100, delta=0.12 if passed else 0.01,
        p_value=0.004 if passed else 0.41, test_set_sha256="c" * 64,
        failed=[] if passed else [Notice(reason_code="gate.not_significant", message="p 0.41 >= alpha 0.05")])
    return envelope(ExportCompleted(plan=plan(target), base_model="m", export=ref(f"x-{run_id}"),
                                    format="peft-lora-safetensors", files={}, candidate=M, base=M, gate=gate),
                    run_id=run_id, producer="export")


async def start_registry(nats_server, tmp_path, name="registry", **kw):
    svc = build(RegistrySettings(nats_url=nats_server.url, data_dir=tmp_path / name, smoke=False, **kw))
    await svc.prepare_broker()
    await svc.broker.start()
    return svc


async def register(js, target: str, runs: dict[str, bool | None]) -> None:
    """Export each run (gate passed, failed, or None: no gate) and wait for its registration and verdict."""
    known = len((await read_target(js, target)).versions)
    for run_id, passed in runs.items():
        env = export_completed(run_id, target, passed)
        await publish(js, env, subjects.subject_for(env.type, kind="event"))

    async def settled():
        state = await read_target(js, target)
        return len(state.versions) == known + len(runs) and all(
            v.status != "candidate" or v.gate is None for v in state.versions.values())

    await wait_for(settled)


def cmd(cls, target, **kw):
    return cls(target=target, actor=kw.pop("actor", "alice"), reason=kw.pop("reason", "because"), **kw)


async def test_the_lifecycle_register_validate_promote_reject_rollback_restore_and_the_serving_bucket(js, nats_server, tmp_path):
    svc = await start_registry(nats_server, tmp_path)
    t = "faq-bot"
    try:
        await register(js, t, {"run-1": True, "run-2": False})
        s = await read_target(js, t)
        assert (s.versions[1].status, s.versions[2].status) == ("validated", "rejected")
        assert "gate.not_significant" in s.versions[2].rejection

        got, s = await send(js, cmd(PromoteVersion, t, version="1", reason="beats the classical baseline"))
        assert got["type"] == "registry.promoted" and s.production.version == 1
        assert got["payload"]["smoke"]["skipped"]  # smoke disabled in this test; its own test runs it
        # the bucket follows the log (written after the append): a gateway sees the switch a few ms later
        assert (await wait_for(lambda: _serving_at(js, t, s.last_sequence)))["version"] == 1

        with pytest.raises(Refused) as blocked:
            await send(js, cmd(PromoteVersion, t, version="2"))
        assert blocked.value.reason_code == "registry.promote_blocked"
        got, s = await send(js, cmd(PromoteVersion, t, version="v2", override=True, reason="hotfix: v1 mislabels refunds"))
        assert got["payload"]["override"] and got["payload"]["demoted"] == 1 and s.versions[1].status == "archived"

        await register(js, t, {"run-3": True})
        got, s = await send(js, cmd(RejectVersion, t, version="run-3", actor="bob", reason="trained on stale labels"))
        assert got["type"] == "registry.rejected" and s.versions[3].status == "rejected"

        got, s = await send(js, cmd(RollBackTarget, t, reason="error rate up"))
        assert (got["payload"]["version"], got["payload"]["demoted"]) == (1, 2) and s.production.version == 1
        got, s = await send(js, cmd(RestoreVersion, t, version="2", reason="the error was upstream"))
        assert got["type"] == "registry.restored" and s.production.version == 2
        got, s = await send(js, cmd(SetRollout, t, percent=25))
        entry = await wait_for(lambda: _serving_at(js, t, s.last_sequence))
        assert (entry["version"], entry["rollout_percent"], entry["by"]) == (2, 25, "alice")

        for bad, code in [(cmd(PromoteVersion, t, version="9"), "registry.version_not_found"),
                          (cmd(PromoteVersion, t, version="2"), "registry.already_production"),
                          (cmd(RestoreVersion, t, version="3"), "registry.not_archived"),
                          (cmd(PromoteVersion, "no-such-target", version="1"), "registry.target_not_found")]:
            before = (await read_target(js, bad.target)).last_sequence
            with pytest.raises(Refused) as refused:
                await send(js, bad)
            assert refused.value.reason_code == code
            assert (await read_target(js, bad.target)).last_sequence == before  # the registry unchanged
    finally:
        await svc.broker.stop()


async def _serving_at(js, target, seq):
    entry = await serving.read(js, target)
    return entry if entry and entry["log_sequence"] >= seq else None


async def test_a_run_of_another_target_is_named_as_such(js, nats_server, tmp_path):
    svc = await start_registry(nats_server, tmp_path)
    try:
        await register(js, "a-target", {"run-a": True})
        await register(js, "b-target", {"run-b": True})
        with pytest.raises(Refused) as refused:
            await send(js, cmd(PromoteVersion, "b-target", version="run-a"))
        assert refused.value.reason_code == "registry.version_of_other_target" and "a-target" in str(refused.value)
    finally:
        await svc.broker.stop()


async def test_auto_promote_policy_promotes_a_validated_version_and_not_a_rejected_one(js, nats_server, tmp_path):
    svc = await start_registry(nats_server, tmp_path, auto_promote=["auto-t"])
    try:
        await register(js, "auto-t", {"run-1": True})
        s = await wait_for(lambda: _with_production(js, "auto-t"))
        assert s.production.actor == "registry:auto_promote" and s.production.version == 1
        await register(js, "auto-t", {"run-2": False})
        await asyncio.sleep(0.5)
        s = await read_target(js, "auto-t")
        assert s.production.version == 1 and s.versions[2].status == "rejected"
    finally:
        await svc.broker.stop()


async def _with_production(js, target):
    s = await read_target(js, target)
    return s if s.production else None


async def test_a_redelivered_command_appends_nothing_twice(js, nats_server, tmp_path):
    svc = await start_registry(nats_server, tmp_path)
    t = "idem"
    try:
        await register(js, t, {"run-1": True})
        c = cmd(PromoteVersion, t, version="1")
        mt = message_type_of(c)
        env = Envelope(type=mt.name, schema_version=1, run_id="r", correlation_id="r", producer="test",
                       payload=c.model_dump(mode="json"))
        for i in range(2):  # the same command id again, past the bus's duplicate check (another Nats-Msg-Id)
            await js.publish(subjects.subject_for(mt.name, kind="command"), env.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": f"again-{i}"})
        await wait_for(lambda: _with_production(js, t))
        await asyncio.sleep(1.0)
        promoted = [e for _, e in await target_events(js, t) if e and e["type"] == "registry.promoted"]
        assert len(promoted) == 1
    finally:
        await svc.broker.stop()


async def race(js, target: str, commands: list) -> tuple[list[str], list[str]]:
    """Fire commands decided on the same state at once; (winning event types, refusal codes)."""
    seq = (await read_target(js, target)).last_sequence
    results = await asyncio.gather(*(send(js, c.model_copy(update={"expected_sequence": seq})) for c in commands),
                                   return_exceptions=True)
    won = [r[0]["type"] for r in results if not isinstance(r, BaseException)]
    lost = [r.reason_code for r in results if isinstance(r, Refused)]
    others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, Refused)]
    assert not others, others
    return won, lost


async def test_racing_commands_on_one_target_have_exactly_one_winner_and_nothing_half_applied(js, nats_server, tmp_path):
    """Two registry processes compete for the commands: the append's expected sequence decides."""
    a = await start_registry(nats_server, tmp_path, name="a")
    b = await start_registry(nats_server, tmp_path, name="b")
    t = "raced"
    try:
        await register(js, t, {f"run-{i}": True for i in range(1, 5)})
        await send(js, cmd(PromoteVersion, t, version="1"))
        await send(js, cmd(PromoteVersion, t, version="2"))
        for _ in range(5):
            before = await read_target(js, t)
            won, lost = await race(js, t, [cmd(PromoteVersion, t, version="3"), cmd(PromoteVersion, t, version="4"),
                                           cmd(RollBackTarget, t)])
            assert len(won) == 1 and lost == ["registry.conflict"] * 2
            after = await target_events(js, t, after=before.last_sequence)
            assert len(after) == 1 and after[0][1]["type"] == won[0]  # one event appended, whole
            s = await read_target(js, t)
            assert sum(v.status == "production" for v in s.versions.values()) == 1
            if s.production.version in (3, 4):  # back to a state where all three apply
                await send(js, cmd(RestoreVersion, t, version="2"))
            else:
                await send(js, cmd(RestoreVersion, t, version="2"))
                await send(js, cmd(RollBackTarget, t))
                await send(js, cmd(RestoreVersion, t, version="2"))
    finally:
        await a.broker.stop()
        await b.broker.stop()


async def test_serving_at_a_time_is_answered_from_run_events(js, nats_server, database, tmp_path):
    from services.audit.db import connect_as_app
    from tests.connected.test_audit import start_audit, stop_audit

    svc = await start_registry(nats_server, tmp_path)
    audit = await start_audit(nats_server, database, tmp_path)
    t = "timed"
    try:
        await register(js, t, {"run-1": True, "run-2": True})
        p1, _ = await send(js, cmd(PromoteVersion, t, version="1", actor="alice", reason="first"))
        await asyncio.sleep(0.05)
        p2, s = await send(js, cmd(PromoteVersion, t, version="2", actor="bob", reason="second"))
        conn = await connect_as_app(database)
        try:
            last = s.last_sequence
            await wait_for(lambda: conn.fetchval("SELECT count(*) >= 1 FROM run_events WHERE global_position = $1", last))
            from datetime import datetime

            t1 = datetime.fromisoformat(p1["occurred_at"])
            t2 = datetime.fromisoformat(p2["occurred_at"])
            mid = t1 + (t2 - t1) / 2
            then = await serving_at(conn, t, mid)
            now = await serving_at(conn, t)
            assert (then["serving"]["version"], then["serving"]["by"], then["serving"]["reason"]) == (1, "alice", "first")
            assert (now["serving"]["version"], now["serving"]["by"]) == (2, "bob")
            assert (await serving_at(conn, t, t1 - timedelta(microseconds=1)))["serving"] is None  # registered, not served
            with pytest.raises(Refused) as early:
                await serving_at(conn, t, t1 - timedelta(days=1))
            assert early.value.reason_code == "registry.invalid_time"
            with pytest.raises(Refused) as future:
                await serving_at(conn, t, datetime.now(t1.tzinfo) + timedelta(days=1))
            assert future.value.reason_code == "registry.invalid_time"
            with pytest.raises(Refused) as missing:
                await serving_at(conn, "never-registered")
            assert missing.value.reason_code == "registry.target_not_found"
        finally:
            await conn.close()
        assert json.loads(json.dumps(now, default=str))["serving"]["gate_event_id"]
    finally:
        await stop_audit(audit)
        await svc.broker.stop()


async def test_a_promotion_whose_smoke_check_cannot_reproduce_is_refused_and_appends_nothing(js, nats_server, tmp_path):
    svc = build(RegistrySettings(nats_url=nats_server.url, data_dir=tmp_path / "s", smoke=True))
    await svc.prepare_broker()
    await svc.broker.start()
    try:
        await register(js, "smoked", {"run-1": True})  # an export with no per-row records to reproduce
        before = (await read_target(js, "smoked")).last_sequence
        with pytest.raises(Refused) as refused:
            await send(js, cmd(PromoteVersion, "smoked", version="1"))
        assert refused.value.reason_code == "registry.smoke_failed" and "no per-row records" in str(refused.value)
        assert (await read_target(js, "smoked")).last_sequence == before and await serving.read(js, "smoked") is None
    finally:
        await svc.broker.stop()


async def test_export_finds_the_gate_decision_behind_an_evaluation(js):
    from contracts.events import GateDecided
    from services.export.evidence import find_gate_verdict, gate_event_id

    trigger = uuid.uuid4()
    gate = GateDecided(target="t", passed=False, failed=[Notice(reason_code="gate.delta_below_margin", message="0.01")],
                       candidate="candidate", baseline="classical:tfidf-logreg", baseline_kind="classical",
                       records=ref("rec"), test_set_sha256="d" * 64, judge_id="rubric:x",
                       evidence={"n": 50, "delta": 0.01, "p_value": 0.3})
    other = envelope(gate, run_id="other")  # another run's decision, published in between
    mine = envelope(gate, run_id="r", event_id=gate_event_id(trigger))
    for env in (mine, other):
        await publish(js, env, subjects.subject_for(env.type, kind="event"))
    last = (await js.stream_info(subjects.STREAM)).state.last_seq
    verdict = await find_gate_verdict(js, trigger, last)
    assert verdict.event_id == str(mine.event_id) and not verdict.passed and verdict.n == 50
    assert [n.reason_code for n in verdict.failed] == ["gate.delta_below_margin"]
    assert await find_gate_verdict(js, uuid.uuid4(), last) is None
