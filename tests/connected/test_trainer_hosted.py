"""Hosted training through the trainer service (D12), on a real nats-server: the real `openai` SDK
talks to the stateful fake of the documented fine-tuning API (the only fake, at the HTTP edge).

The run's events say what a user needs: the cost estimate before the job, the job id, progress and
checkpoints normalised into `training.*`, the trained tokens after; cancel reaches the provider;
a failed job is a `training.failed` with its reason code; the API key is nowhere in the stream.
Delivery (D3/D5): a slow upload does not get the trigger redelivered to a second trainer (one job);
each pause and resume is its own event, and a redelivery names them the same way; a redelivery
after completion publishes the same training.completed and touches the provider no more."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest

from contracts import subjects
from contracts.commands import CancelTraining, PauseTraining, ResumeTraining
from contracts.common import HostedSettings, RunPlan
from contracts.events import CostEstimate, PrepPrepared
from contracts.registry import decode, encode
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from services.common.delivery import StageContext
from services.trainer import app as trainer_app
from services.trainer import hosted_runner
from services.trainer.control import ControlRegistry
from services.trainer.hosted.base import HostedOutcome, HostedProgress
from services.trainer.hosted.openai_backend import METADATA_KEY
from services.trainer.local.engine import Control
from services.trainer.settings import TrainerSettings
from tests.conftest import wait_for
from tests.factories import HeartbeatOnlyMsg, envelope, ref
from tests.unit.test_hosted_openai import KEY, FakeProvider, backend_for

pytestmark = pytest.mark.connected

COST = CostEstimate(model="gpt-4o-mini-2024-07-18", training_tokens=1200, epochs=3, usd_per_1m_tokens=3.0,
                    usd=0.013, prices_as_of="2026-04")


class DocumentedMetadataProvider(FakeProvider):
    """The fake, also refusing job metadata the API reference does not allow: at most 16 pairs, keys
    strings of up to 64 characters, values strings of up to 512."""

    def create_job(self, body: dict):
        from tests.unit.test_hosted_openai import _error

        md = body.get("metadata")
        if md is not None and (not isinstance(md, dict) or len(md) > 16 or any(
                not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
                for k, v in md.items())):
            return _error(400, "Invalid 'metadata': at most 16 string pairs (keys <= 64, values <= 512 chars)",
                          param="metadata")
        return super().create_job(body)


@pytest.fixture
def fake(monkeypatch):
    provider = DocumentedMetadataProvider(total_steps=3)
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


async def start_trainer(nats_server, tmp_path, ack_wait_s: float = 5):
    svc = trainer_app.build(TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data",
                                            ack_wait_s=ack_wait_s))
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
    # The provider's record is archived: every job event once, the job at each status, checkpoints, result file.
    job_id = started.hosted_job_id
    archived_events = [ev.id for e, b in evs if e.type == "training.provider_event" for ev in b.events]
    assert archived_events == [e["id"] for e in fake.events[job_id]]
    assert [p.status for e, p in evs if e.type == "training.provider_job"] == [  # the fake moves on at each GET
        "queued", "running", "succeeded"]
    archive = by_type["training.provider_archived"]
    assert archive.events_archived == len(archived_events) and [c.step for c in archive.checkpoints] == [1, 2, 3]
    assert archive.checkpoints[-1].metrics["full_valid_loss"] == round(2.3 / 3, 4)
    files = {f.role: f for f in archive.files}
    assert files["training"].artifact.sha256 == prepared_event(tmp_path, "x").payload["openai_train"]["sha256"]
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    assert store.read_bytes(files["result"].artifact) == fake.contents[fake.jobs[job_id]["result_files"][0]]
    assert types.index("training.provider_archived") < types.index("training.completed")
    assert done.adapter is None and done.backend == "openai" and done.steps == 3
    (body,) = fake.bodies
    assert body["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    # keyed by the trigger (D3): a redelivered prep.prepared finds this job instead of creating another
    # and tagged with the run and the trigger that created it
    trigger = evs[0][0]
    assert body["metadata"] == {METADATA_KEY: hosted_runner.hosted_key(trigger.event_id),
                                "tuneline_run_id": "run-hosted", "tuneline_trigger_event_id": str(trigger.event_id)}


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


async def test_slow_upload_is_held_by_heartbeats_so_no_second_trainer_creates_a_second_job(
        js, nats_server, tmp_path, fake, monkeypatch):
    """The upload and the job creation outlast ack_wait: the trigger is heartbeated meanwhile, so the
    second trainer never gets it (before, it found no job yet and created a second, billed one)."""
    handle = fake.handle

    def slow(request):
        if request.method == "POST" and request.url.path.endswith("/files"):
            time.sleep(3)  # a large training file on a real link
        return handle(request)

    monkeypatch.setattr(fake, "handle", slow)
    trainers = [await start_trainer(nats_server, tmp_path, ack_wait_s=2) for _ in range(2)]
    try:
        await publish(js, prepared_event(tmp_path, "run-slow"), subjects.subject_for("prep.prepared", kind="event"))
        await until(js, "run-slow", "training.completed")
        info = await js.consumer_info(subjects.STREAM, trainer_app.PREPARED.durable)
    finally:
        for svc in trainers:
            await svc.broker.stop()
    assert fake.count("POST", "/fine_tuning/jobs") == 1 and len(fake.jobs) == 1
    assert info.num_redelivered == 0


async def test_each_pause_and_resume_of_a_hosted_job_is_its_own_event(js, nats_server, tmp_path, fake):
    fake.outcome = "hang"
    fake.total_steps = 1000

    async def command(cmd) -> None:
        env = envelope(cmd, run_id="run-pauses", producer="cli")
        await publish(js, env, subjects.subject_for(env.type, kind="command"))

    async def count(type_name: str, n: int) -> None:
        async def enough():
            return len([1 for e, _ in await run_events(js, "run-pauses") if e.type == type_name]) >= n

        await wait_for(enough, timeout=30)

    async def pause_resume_twice_then_cancel():
        await until(js, "run-pauses", "training.progress")
        for n in (1, 2):
            await command(PauseTraining(requested_by="alice"))
            await count("training.paused", n)
            await command(ResumeTraining(requested_by="alice"))
            await count("training.resumed", n)
        await command(CancelTraining(requested_by="carol"))

    evs = await hosted_run(js, nats_server, tmp_path, "run-pauses", "training.failed",
                           meanwhile=pause_resume_twice_then_cancel)
    controls = [(e.type, e.event_id) for e, _ in evs if e.type in ("training.paused", "training.resumed")]
    assert [t for t, _ in controls] == ["training.paused", "training.resumed"] * 2
    assert len({i for _, i in controls}) == 4
    assert fake.count("POST", r"/fine_tuning/jobs/.*/pause") == 2
    assert fake.count("POST", r"/fine_tuning/jobs/.*/resume") == 2


class ScriptedBackend:
    """A provider whose job sees the run's pause/resume commands arrive one per poll."""

    def __init__(self, control: Control, script: list[str]) -> None:
        self.control, self.script, self.calls = control, script, []

    def submit(self, spec):
        return "ftjob-1"

    def pause(self, job_id):
        self.calls.append("pause")

    def resume(self, job_id):
        self.calls.append("resume")

    def cancel(self, job_id):
        self.calls.append("cancel")

    def follow(self, job_id, *, on_progress, poll_interval, timeout, on_poll, **_archive_hooks):
        for step, change in enumerate(self.script, 1):
            getattr(self.control, change)("alice")
            on_poll("running")
            on_progress(HostedProgress(step=step, total_steps=len(self.script), train_loss=1.0 / step))
        return HostedOutcome(job_id=job_id, status="succeeded", fine_tuned_model="ft:x", trained_tokens=10)


async def _published(nats_server):
    nc = await nats.connect(nats_server.url)
    seen: list[tuple[str, bytes]] = []

    async def cb(msg) -> None:
        seen.append((msg.subject, msg.data))

    await nc.subscribe(f"{subjects.EVENTS}.>", cb=cb)
    await nc.flush()
    return nc, seen


async def test_a_redelivery_names_pause_and_resume_transitions_the_same_way(js, nats_server, tmp_path):
    """Each delivery's Control is rebuilt from the same command history, so the transition counter in the
    event ids agrees: a redelivery re-announces a transition under its id, a new one gets a new id."""
    env = prepared_event(tmp_path, "run-redeliver-pause")
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    settings = TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")
    nc, seen = await _published(nats_server)
    ids = []
    try:
        for script in (["pause", "resume", "pause", "resume"], ["pause", "resume", "pause", "resume", "pause", "resume"]):
            control = Control()
            backend = ScriptedBackend(control, script)
            _, payload = decode(encode(env))
            ctx = StageContext(env, payload, "trainer", js, store, settings, HeartbeatOnlyMsg())
            before = len(seen)
            await hosted_runner.train_hosted(ctx, payload.plan.hosted, control, None, backend=backend)
            await nc.flush()
            await asyncio.sleep(0.2)
            ids.append([(s.rsplit(".", 1)[-1], decode(d)[0].event_id) for s, d in seen[before:]
                        if s.endswith((".training.paused", ".training.resumed"))])
            assert backend.calls == script
    finally:
        await nc.close()
    first, again = ids
    assert [t for t, _ in first] == ["paused", "resumed"] * 2 and len({i for _, i in first}) == 4
    assert again[:4] == first  # the same transitions, the same ids
    assert len({i for _, i in again}) == 6  # the third pause/resume are new events
    stored = [e for e, _ in await run_events(js, "run-redeliver-pause") if e.type in ("training.paused", "training.resumed")]
    assert len(stored) == 6


async def test_a_redelivery_after_hosted_completion_does_not_touch_the_provider(js, nats_server, tmp_path, fake):
    env = prepared_event(tmp_path, "run-hosted-again")
    settings = TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    handler = trainer_app.make_on_prepared(settings, ControlRegistry())
    nc, seen = await _published(nats_server)
    try:
        _, payload = decode(encode(env))
        await handler(StageContext(env, payload, "trainer", js, store, settings, HeartbeatOnlyMsg()))
        await nc.flush()
        await asyncio.sleep(0.2)
        first, requests = list(seen), len(fake.requests)
        _, payload = decode(encode(env))
        await handler(StageContext(env, payload, "trainer", js, store, settings, HeartbeatOnlyMsg()))  # the redelivery
        await nc.flush()
        await asyncio.sleep(0.2)
        again = seen[len(first):]
    finally:
        await nc.close()
    completed = [(s, d) for s, d in first if s.endswith(".training.completed")]
    assert len(completed) == 1 and again == completed  # the identical event, nothing else
    assert len(fake.requests) == requests  # no upload, no job lookup, no second job


async def test_a_redelivery_that_follows_the_job_again_archives_nothing_twice(js, nats_server, tmp_path, fake):
    """The trigger comes back before the completion was recorded (the trainer died after archiving): the job is
    followed from its first event again, cuts the same batches and snapshots under the same ids."""
    from services.trainer.completion import completion_record_path

    env = prepared_event(tmp_path, "run-archive-again")
    settings = TrainerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    handler = trainer_app.make_on_prepared(settings, ControlRegistry())
    nc, seen = await _published(nats_server)
    archive_types = (".training.provider_event", ".training.provider_job", ".training.provider_archived")
    try:
        ids = []
        for _ in range(2):
            _, payload = decode(encode(env))
            before = len(seen)
            await handler(StageContext(env, payload, "trainer", js, store, settings, HeartbeatOnlyMsg()))
            await nc.flush()
            await asyncio.sleep(0.2)
            ids.append([decode(d)[0].event_id for s, d in seen[before:] if s.endswith(archive_types)])
            completion_record_path(settings.data_dir, env.event_id).unlink()
    finally:
        await nc.close()
    first, again = ids
    # The job had ended: the second follow sees it succeeded at once (one snapshot), every event again, and
    # cuts the same batches: every id it publishes is one the first published.
    assert first and again and set(again) <= set(first)
    stored = [e for e, _ in await run_events(js, "run-archive-again") if e.type.startswith("training.provider_")]
    assert len(stored) == len(first)  # the bus took each id once
