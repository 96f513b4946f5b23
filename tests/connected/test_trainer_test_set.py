"""The trainer passes prep's splits on (D14): `training.completed` of a hosted run names the train split,
the frozen test set and its record, as prep.prepared gave them, so the evaluator scores the test set the
trainer never saw. (The local path: tests/connected/test_trainer_service.py, the redelivery test.)"""

from __future__ import annotations

import json

import pytest

from contracts import subjects
from contracts.common import HostedSettings, RunPlan
from contracts import events
from contracts.events import PrepPrepared
from contracts.registry import decode
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from services.trainer import app as trainer_app
from services.trainer import hosted_runner
from services.trainer.settings import TrainerSettings
from tests.conftest import wait_for
from tests.factories import envelope, ref
from tests.unit.test_hosted_openai import KEY, FakeProvider, backend_for

pytestmark = pytest.mark.connected


async def completed_of(js, run_id: str):
    info = await js.stream_info(subjects.STREAM)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.STREAM, seq)
        if msg.subject == subjects.subject_for("training.completed", kind="event"):
            env, payload = decode(msg.data)
            if env.run_id == run_id:
                return payload
    return None


async def test_a_hosted_run_carries_train_and_the_frozen_test_set_to_training_completed(js, nats_server, tmp_path,
                                                                                          monkeypatch):
    provider = FakeProvider(total_steps=3)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setattr(hosted_runner, "backend_for", lambda backend, hosted: backend_for(provider))
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    row = {"messages": [{"role": "user", "content": "great film"}, {"role": "assistant", "content": "positive"}]}
    chat = store.put_bytes(("\n".join(json.dumps(row) for _ in range(12)) + "\n").encode())
    train = store.put_bytes(b'{"row_number": 1, "text": "great film", "label": "pos"}\n'
                            b'{"row_number": 2, "text": "awful film", "label": "neg"}\n')
    test = store.put_bytes(b'{"row_number": 3, "text": "fine film", "label": "pos", "row_id": "0123456789abcdef"}\n')
    test_set = events.TestSetRef(target="sentiment", sha256=test.sha256, rows=1, artifact=test, origin="first_run",
                          frozen_by_run_id="run-0")
    plan = RunPlan(locator="jsonl:/x.jsonl", target="sentiment", backend="openai",
                   hosted=HostedSettings(n_epochs=3, poll_interval_s=0.01, timeout_s=30))
    payload = PrepPrepared(plan=plan, manifest=ref("m"), train=train, eval=train, label_space=["neg", "pos"],
                           train_rows=2, eval_rows=2, dataset_version="v1", openai_train=chat, openai_eval=chat,
                           test=test, test_rows=1, test_set=test_set)
    svc = trainer_app.build(TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", ack_wait_s=5))
    await svc.prepare_broker()
    await svc.broker.start()
    try:
        await publish(js, envelope(payload, run_id="run-splits", producer="prep"),
                      subjects.subject_for("prep.prepared", kind="event"))
        done = await wait_for(lambda: completed_of(js, "run-splits"), timeout=60)
    finally:
        await svc.broker.stop()
    assert done.backend == "openai" and done.fine_tuned_model
    assert (done.train, done.test, done.test_set) == (train, test, test_set)
