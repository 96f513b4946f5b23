"""The trainer's crash-safety pieces without servers: the completion record a redelivered trigger
replays instead of training again (D3/D5), the pause/resume transition counter that names hosted
pause/resume events, and the tags on hosted jobs."""

from __future__ import annotations

import json
import uuid

import pytest

from contracts import events
from contracts.events import PrepPrepared, TrainingCompleted
from contracts.registry import encode
from services.common.delivery import StageContext
from services.trainer.completion import completion_record_path, read_completion_record, write_completion_record
from services.trainer.hosted.base import HostedJobSpec
from services.trainer.hosted.openai_backend import METADATA_KEY
from services.trainer.local.engine import Control
from tests.factories import envelope, plan, ref
from tests.unit.test_hosted_openai import KEY, FakeProvider, backend_for


def _test_set() -> events.TestSetRef:
    return events.TestSetRef(target="support-intents", sha256=ref("test").sha256, rows=6, artifact=ref("test"),
                      origin="first_run", frozen_by_run_id="run-0")


def _trigger_and_completed():
    trigger = envelope(PrepPrepared(plan=plan(), manifest=ref("m"), train=ref("t"), eval=ref("e"), label_space=["a", "b"],
                                    train_rows=10, eval_rows=4, dataset_version="v1", test=ref("test"), test_rows=6,
                                    test_set=_test_set()), run_id="run-1", producer="prep")
    ctx = StageContext(trigger, None, "trainer", None, None, None, None)
    completed = TrainingCompleted(plan=plan(), base_model="/m", adapter=ref("adapter"), manifest=ref("m"), eval=ref("e"),
                                  label_space=["a", "b"], steps=20, final_loss=0.123456789012345, examples_per_s=51.5,
                                  wall_s=1.0 / 3, best_step=20, best_metric=0.97, metric_name="macro_f1",
                                  train=ref("t"), test=ref("test"), test_set=_test_set())
    return trigger, ctx.envelope_for(completed)


def test_completion_record_round_trips_the_identical_envelope(tmp_path):
    trigger, env = _trigger_and_completed()
    path = completion_record_path(tmp_path, trigger.event_id)
    assert read_completion_record(path, trigger.event_id, env.event_id) is None  # none yet
    write_completion_record(path, trigger.event_id, env)
    back = read_completion_record(path, trigger.event_id, env.event_id)
    assert back is not None and encode(back) == encode(env)  # same id, payload, occurred_at: the same bytes
    assert back.payload["test_set"]["sha256"] == ref("test").sha256  # the splits the evaluator reads travel with it
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "not_json", "digest", "other_trigger", "other_event", "empty"])
def test_a_damaged_completion_record_is_ignored(tmp_path, damage):
    trigger, env = _trigger_and_completed()
    path = completion_record_path(tmp_path, trigger.event_id)
    write_completion_record(path, trigger.event_id, env)
    text = path.read_text()
    record = json.loads(text)
    if damage == "truncated":  # a partial write (not produced by the atomic rename, but a disk can lose data)
        path.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        path.write_bytes(b"\x00\xff garbage")
    elif damage == "digest":
        record["envelope"] = record["envelope"].replace('"steps":20', '"steps":21')
        path.write_text(json.dumps(record))
    elif damage == "other_trigger":
        record["trigger_event_id"] = str(uuid.uuid4())
        path.write_text(json.dumps(record))
    elif damage == "empty":
        path.write_text("")
    expected = uuid.uuid4() if damage == "other_event" else env.event_id
    assert read_completion_record(path, trigger.event_id, expected) is None


def test_control_counts_pause_resume_transitions():
    c = Control()
    states = []
    for action in ("pause", "pause", "resume", "resume", "pause", "resume"):
        getattr(c, action)("alice")
        states.append(c.pause_state())
    assert states == [(True, 1, "alice"), (True, 1, "alice"), (False, 2, "alice"), (False, 2, "alice"),
                      (True, 3, "alice"), (False, 4, "alice")]
    c.cancel("bob")
    c.resume("bob")
    assert c.transitions == 4 and c.cancelled and not c.paused


def test_hosted_job_is_tagged_with_labels_besides_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    train = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "positive"}]}
    train.write_text("\n".join(json.dumps(row) for _ in range(12)) + "\n")
    fake = FakeProvider()
    backend = backend_for(fake)
    labels = {"tuneline_run_id": "run-1", "tuneline_trigger_event_id": str(uuid.uuid4())}
    spec = HostedJobSpec(base_model="gpt-4o-mini-2024-07-18", training_file=train, idempotency_key="k-1", labels=labels)
    job = backend.submit(spec)
    assert fake.bodies[0]["metadata"] == {**labels, METADATA_KEY: "k-1"}
    assert backend.submit(spec) == job and fake.count("POST", "/fine_tuning/jobs") == 1  # found again by its key
    with pytest.raises(ValueError):
        HostedJobSpec(base_model="m", training_file=train, idempotency_key="k", labels={"x" * 65: "v"})
    with pytest.raises(ValueError):
        HostedJobSpec(base_model="m", training_file=train, idempotency_key="k", labels={f"k{i}": "v" for i in range(16)})
