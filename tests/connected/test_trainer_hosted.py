"""Hosted training through the trainer service (D12), on a real nats-server: the real `openai` SDK
talks to the stateful fake of the documented fine-tuning API (the only fake, at the HTTP edge).

The run's events say what a user needs: the cost estimate before the job, the job id, progress and
checkpoints normalised into `training.*`, the trained tokens after; cancel reaches the provider;
a failed job is a `training.failed` with its reason code; the API key is nowhere in the stream."""

from __future__ import annotations

import json

import pytest

from contracts import subjects
from contracts.commands import CancelTraining
from contracts.common import HostedSettings, RunPlan
from contracts.events import CostEstimate, PrepPrepared
from contracts.registry import decode
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from services.trainer import app as trainer_app
from services.trainer import hosted_runner
from services.trainer.hosted.openai_backend import METADATA_KEY
from services.trainer.settings import TrainerSettings
from tests.conftest import wait_for
from tests.factories import envelope, ref
from tests.unit.test_hosted_openai import KEY, FakeProvider, backend_for

pytestmark = pytest.mark.connected

COST = CostEstimate(model="gpt-4o-mini-2024-07-18", training_tokens=1200, epochs=3, usd_per_1m_tokens=3.0,
                    usd=0.013, prices_as_of="2026-04")


@pytest.fixture
def fake(monkeypatch):
    provider = FakeProvider(total_steps=3)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setattr(hosted_runner, "backend_for", lambda backend, hosted: backend_for(provider))
    return provider


def prepared_event(tmp_path, run_id: str):
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    row = {"messages": [{"role": "user", "content": "great film"}, {"role": "assistant", "content": "positive"}]}
    chat = store.put_bytes(("\n".join(json.dumps(row) for _ in range(12)) + "\n").encode())
    split = store.put_bytes(b'{"row_number": 1, "text": "great film", "label": "pos"}\n'
                            b'{"row_number": 2, "text": "awful film", "label": "neg"}\n')
    plan = RunPlan(locator="jsonl:/x.jsonl", target="sentiment", backend="openai",
                   hosted=HostedSettings(n_epochs=3, poll_interval_s=0.01, timeout_s=30))
    payload = PrepPrepared(plan=plan, manifest=ref("m"), train=split, eval=split, label_space=["neg", "pos"],
                           train_rows=2, eval_rows=2, dataset_version="v1", openai_train=chat, openai_eval=chat,
                           cost_estimate=COST)
    return envelope(payload, run_id=run_id, producer="prep")


async def start_trainer(nats_server, tmp_path):
    svc = trainer_app.build(TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", ack_wait_s=5))
    await svc.prepare_broker()
    await svc.broker.start()
    return svc


async def run_events(js, run_id: str) -> list:
    info = await js.stream_info(subjects.STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.STREAM, seq)
        assert KEY.encode() not in msg.data  # the API key never reaches the bus
        env, payload = decode(msg.data)
        if env.run_id == run_id:
            out.append((env, payload))
    return out


async def until(js, run_id: str, type_name: str, timeout: float = 60):
    async def found():
        evs = await run_events(js, run_id)
        return evs if any(e.type == type_name for e, _ in evs) else None

    return await wait_for(found, timeout=timeout)


async def hosted_run(js, nats_server, tmp_path, run_id: str, until_type: str, *, meanwhile=None) -> list:
    """Start a trainer, publish a hosted run's prep.prepared, (do `meanwhile`), wait for `until_type`."""
    svc = await start_trainer(nats_server, tmp_path)
    try:
        await publish(js, prepared_event(tmp_path, run_id), subjects.subject_for("prep.prepared", kind="event"))
        if meanwhile is not None:
            await meanwhile()
        return await until(js, run_id, until_type)
    finally:
        await svc.broker.stop()


async def test_hosted_job_records_cost_before_and_tokens_after(js, nats_server, tmp_path, fake):
    evs = await hosted_run(js, nats_server, tmp_path, "run-hosted", "training.completed")
    types = [e.type for e, _ in evs]
    assert types[:3] == ["prep.prepared", "preflight.passed", "training.started"]
    assert types[-1] == "training.completed"
    by_type = {e.type: p for e, p in evs}
    assert by_type["preflight.passed"].train_plan.cost_estimate == COST        # before the job
    started = by_type["training.started"]
    assert started.cost_estimate == COST and started.hosted_job_id in fake.jobs
    assert [p.step for e, p in evs if e.type == "training.progress"] == [1, 2, 3]
    assert len([1 for e, _ in evs if e.type == "training.checkpointed"]) == 3
    done = by_type["training.completed"]
    assert done.trained_tokens == 5768 and done.fine_tuned_model.startswith("ft:gpt-4o-mini")  # after the job
    assert done.adapter is None and done.backend == "openai" and done.steps == 3
    (body,) = fake.bodies
    assert body["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    # keyed by the trigger (D3): a redelivered prep.prepared finds this job instead of creating another
    assert body["metadata"] == {METADATA_KEY: hosted_runner.hosted_key(evs[0][0].event_id)}


async def test_cancel_command_reaches_the_provider(js, nats_server, tmp_path, fake):
    fake.outcome = "hang"
    fake.total_steps = 1000

    async def cancel_once_running():
        await until(js, "run-cancel", "training.progress")
        env = envelope(CancelTraining(requested_by="carol"), run_id="run-cancel", producer="cli")
        await publish(js, env, subjects.subject_for(env.type, kind="command"))

    evs = await hosted_run(js, nats_server, tmp_path, "run-cancel", "training.failed", meanwhile=cancel_once_running)
    failed = [e for e, _ in evs if e.type == "training.failed"][0]
    assert failed.reason_code == "training.cancelled"
    assert fake.count("POST", r"/fine_tuning/jobs/.*/cancel") == 1


async def test_failed_job_is_a_training_failure(js, nats_server, tmp_path, fake):
    fake.outcome = "failed"
    evs = await hosted_run(js, nats_server, tmp_path, "run-fail", "training.failed")
    env, payload = [(e, p) for e, p in evs if e.type == "training.failed"][0]
    assert env.reason_code == "training.runtime_error" and "failed" in payload.message
    assert "training.completed" not in [e.type for e, _ in evs]
