"""The target's frozen test set (D14) against a real nats-server (and the recorder on PostgreSQL):

- a target's first run freezes its test set (`prep.test_set_frozen` on the target's own subject, recorded
  in run_events); the next run of the target reuses it (same sha256) and freezes nothing;
- `new_test_set` freezes a new one, which later runs then reuse; what else sits on the subject (junk, another
  target's record) is not a test set;
- two first runs of one target racing end with one frozen test set that both runs use;
- a redelivered trigger publishes the same events again, and no second freeze.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.common import RunPlan
from contracts import events
from contracts.events import IngestCommitted
from contracts.registry import ContractError, decode, encode
from services.audit.app import AuditService
from services.audit.db import connect_as_app
from services.audit.settings import AuditSettings
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from services.common.delivery import StageContext
from services.prep import app as prep_app
from services.prep.settings import PrepSettings
from tests.conftest import wait_for
from tests.factories import HeartbeatOnlyMsg, envelope

pytestmark = pytest.mark.connected

TOPICS = {
    "billing": "my invoice for {i} shows a charge I do not recognise and the amount {i} is wrong",
    "login": "I cannot sign in to account {i} since the password reset mail {i} never arrived",
    "shipping": "parcel {i} is stuck in the depot and the tracking page for order {i} has not moved",
}


def sample(per_label: int, first: int, start: int = 1) -> list[dict]:
    """`per_label` rows of each label, numbered from `first` (the texts) and `start` (the row numbers)."""
    rows = []
    for label, text in TOPICS.items():
        for i in range(first, first + per_label):
            words = " ".join(f"w{label[:2]}{i}x{j}" for j in range(6))
            rows.append({"row_number": start + len(rows), "text": text.format(i=i) + " " + words, "label": label,
                         "provenance": "human"})
    return rows


def committed(store: ArtifactStore, rows: list[dict], run_id: str, target: str, **plan_kw):
    dataset = store.put_bytes("".join(json.dumps(r) + "\n" for r in rows).encode())
    plan = RunPlan(locator="jsonl:/x.jsonl", target=target, until="prep", **plan_kw)
    payload = IngestCommitted(plan=plan, dataset=dataset, rejected=store.put_bytes(b""), rows_read=len(rows),
                              rows_accepted=len(rows), rows_rejected=0, rejected_by_reason={})
    return envelope(payload, run_id=run_id, producer="ingest")


async def on_subject(js, subject_filter: str) -> list:
    """(envelope, payload) of every valid message on the stream matching the filter, in order."""
    out, seq = [], 1
    while True:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=subject_filter, next=True)
        except NotFoundError:
            return out
        try:
            out.append(decode(msg.data))
        except ContractError:
            pass
        seq = msg.seq + 1


async def prepared_of(js, run_id: str):
    for env, payload in await on_subject(js, subjects.subject_for("prep.prepared", kind="event")):
        if env.run_id == run_id:
            return payload
    return None


async def freezes(js, target: str) -> list:
    return [(env, p) for env, p in await on_subject(js, subjects.test_set_filter(target))
            if env.type == "prep.test_set_frozen"]


async def test_first_run_freezes_later_runs_reuse_and_a_new_test_set_is_a_recorded_act(js, nats_server, database,
                                                                                        tmp_path):
    data_dir = tmp_path / "data"
    store = ArtifactStore((data_dir / "artifacts").resolve())
    audit = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "audit",
                                       projector_poll_s=0.1))
    prep = prep_app.build(PrepSettings(nats_url=nats_server.url, data_dir=data_dir))
    for svc in (audit, prep):
        await svc.prepare_broker()
        await svc.broker.start()
    target = "support"
    subject = subjects.subject_for("ingest.committed", kind="event")

    async def run(run_id: str, rows: list[dict], **plan_kw):
        await publish(js, committed(store, rows, run_id, target, **plan_kw), subject)
        return await wait_for(lambda: prepared_of(js, run_id), timeout=60)

    try:
        first = await run("run-1", sample(40, 0))
        assert first.test_set.origin == "first_run" and first.test_set.frozen_by_run_id == "run-1"
        assert first.test_set.sha256 == first.test.sha256 and first.test_rows == first.test_set.rows == 24
        assert first.train_rows + first.eval_rows == 96  # validation comes out of the non-test rows

        # the target's data grew: the first sample again and new rows; the test set stays
        second = await run("run-2", sample(40, 0) + sample(20, 500, start=1000), seed=99)
        assert second.test.sha256 == second.test_set.sha256 == first.test_set.sha256
        assert second.test_set == first.test_set  # frozen by run-1
        assert second.train_rows + second.eval_rows == 96 + 60  # the 24 test rows were dropped as overlap
        test_texts = {json.loads(x)["text"] for x in store.read_bytes(first.test).decode().splitlines()}
        for split in (second.train, second.eval):
            assert test_texts.isdisjoint(json.loads(x)["text"] for x in store.read_bytes(split).decode().splitlines())
        assert len(await freezes(js, target)) == 1

        third = await run("run-3", sample(40, 1000), new_test_set=True)
        assert third.test_set.origin == "new_test_set" and third.test_set.frozen_by_run_id == "run-3"
        assert third.test_set.sha256 != first.test_set.sha256

        # what else is published on the target's subject is not a test set
        frozen_subject = subjects.subject_for("prep.test_set_frozen", kind="event", target=target)
        await js.publish(frozen_subject, b'{"not": "an envelope"}', headers={"Nats-Msg-Id": "junk-1"})
        other = events.TestSetRef(**{**first.test_set.model_dump(), "target": "other"})
        await publish(js, envelope(events.TestSetFrozen(test_set=other, label_space=["billing"]), run_id="run-x"),
                      frozen_subject)
        fourth = await run("run-4", sample(40, 0))
        assert fourth.test_set == third.test_set

        frozen = await freezes(js, target)
        assert [(env.run_id, p.test_set.origin) for env, p in frozen] == [
            ("run-1", "first_run"), ("run-3", "new_test_set"), ("run-x", "first_run")]
        assert frozen[0][1].test_set == first.test_set and frozen[0][1].label_space == ["billing", "login", "shipping"]

        conn = await connect_as_app(database)
        try:
            async def recorded():
                rows = await conn.fetch("SELECT run_id, subject, payload FROM run_events WHERE type = "
                                        "'prep.test_set_frozen' ORDER BY global_position")
                return rows if len(rows) == 3 else None
            rows = await wait_for(recorded, timeout=30)
        finally:
            await conn.close()
        assert [r["run_id"] for r in rows] == ["run-1", "run-3", "run-x"]
        assert {r["subject"] for r in rows} == {"tuneline.evt.testset.support.frozen"}
        assert json.loads(rows[1]["payload"])["test_set"]["sha256"] == third.test_set.sha256
    finally:
        for svc in (prep, audit):
            if svc is audit:
                await svc._shutdown()
            await svc.broker.stop()


async def test_two_first_runs_racing_end_on_one_frozen_test_set(js, nats_server, tmp_path, monkeypatch):
    """Both read the target's (empty) test-set subject before either freezes: one freeze wins, the other
    gets the expected-sequence refusal, reads the winner's test set and prepares again against it."""
    data_dir = tmp_path / "data"
    settings = PrepSettings(nats_url=nats_server.url, data_dir=data_dir)
    store = ArtifactStore(settings.artifact_root)
    target = "racing"
    envs = [committed(store, sample(40, 0), "run-a", target), committed(store, sample(40, 300), "run-b", target)]

    read = prep_app.target_test_sets
    barrier = asyncio.Barrier(2)
    first_reads: set = set()

    async def read_together(js_, target_, trigger):
        sets = await read(js_, target_, trigger)
        if trigger not in first_reads:
            first_reads.add(trigger)
            await barrier.wait()  # the other run has read the subject too: both believe they are first
        return sets

    monkeypatch.setattr(prep_app, "target_test_sets", read_together)
    # two prep processes in production; here two handlers in one process, whose cleaning (one hyperscan
    # scratch per process) must not run in two threads at once
    one_at_a_time, prepare = threading.Lock(), prep_app.prepare

    def prepare_alone(*args, **kw):
        with one_at_a_time:
            return prepare(*args, **kw)

    monkeypatch.setattr(prep_app, "prepare", prepare_alone)

    async def deliver(env):
        _, payload = decode(encode(env))
        await prep_app.on_committed(StageContext(env, payload, "prep", js, store, settings, HeartbeatOnlyMsg()))

    await asyncio.gather(*(deliver(e) for e in envs))
    frozen = await freezes(js, target)
    assert len(frozen) == 1
    winner_env, winner = frozen[0]
    a, b = await prepared_of(js, "run-a"), await prepared_of(js, "run-b")
    assert a.test_set == b.test_set == winner.test_set
    assert a.test.sha256 == b.test.sha256 == winner.test_set.sha256
    loser = b if winner_env.run_id == "run-a" else a
    assert loser.test_set.frozen_by_run_id == winner_env.run_id
    # the loser's own rows are all train or validation: none of them became test rows
    assert loser.train_rows + loser.eval_rows == 120

    # a redelivery of either trigger (its ack lost) publishes the same events and freezes nothing new
    before = await js.stream_info(subjects.STREAM)
    await asyncio.gather(*(deliver(e) for e in envs))
    after = await js.stream_info(subjects.STREAM)
    assert after.state.last_seq == before.state.last_seq  # every re-publish was a duplicate
    assert len(await freezes(js, target)) == 1


async def test_a_lost_test_set_artifact_fails_the_run_with_its_reason_until_a_new_one_is_frozen(js, nats_server,
                                                                                                tmp_path):
    from services.common.delivery import StageError

    settings = PrepSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")
    store = ArtifactStore(settings.artifact_root)

    async def deliver(env):
        _, payload = decode(encode(env))
        await prep_app.on_committed(StageContext(env, payload, "prep", js, store, settings, HeartbeatOnlyMsg()))
        return await prepared_of(js, env.run_id)

    first = await deliver(committed(store, sample(40, 0), "run-1", "lost"))
    store.path(first.test).unlink()  # the artifact store lost the test file
    with pytest.raises(StageError) as e:
        await deliver(committed(store, sample(40, 300), "run-2", "lost"))
    assert e.value.reason_code == "prep.test_set_unreadable" and "--new-test-set" in str(e.value)
    assert await prepared_of(js, "run-2") is None

    third = await deliver(committed(store, sample(40, 300), "run-3", "lost", new_test_set=True))
    assert third.test_set.origin == "new_test_set" and third.test_set.sha256 != first.test_set.sha256
    assert [p.test_set.frozen_by_run_id for _, p in await freezes(js, "lost")] == ["run-1", "run-3"]
