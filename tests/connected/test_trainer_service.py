"""The trainer service against a real nats-server, as its own process (D5):

- SIGKILL mid-run: the trigger is redelivered to a new trainer process, which resumes from the last
  checkpoint (not step 0) and never repeats a step after it;
- cancel, pause and resume are commands that reach the process running the job;
- strict preflight blocks an impossible plan before any training;
- a redelivery after the job completed (a crash or a lost ack before the ack) trains nothing and
  publishes the identical training.completed again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from contracts import subjects  # noqa: E402
from contracts.commands import CancelTraining, PauseTraining, ResumeTraining  # noqa: E402
from contracts.common import RunPlan  # noqa: E402
from contracts import events as contract_events  # noqa: E402
from contracts.events import PrepPrepared  # noqa: E402
from contracts.registry import decode  # noqa: E402
from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.bus import publish  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.factories import HeartbeatOnlyMsg, envelope, ref  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402

pytestmark = pytest.mark.connected
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def prepared(data_dir: Path, tiny_bert: str, run_id: str, **overrides) -> object:
    store = ArtifactStore((data_dir / "artifacts").resolve())
    texts, labels = sentiment_rows()
    lines = "".join(json.dumps({"row_number": i, "text": t, "label": lab}) + "\n"
                    for i, (t, lab) in enumerate(zip(texts, labels)))
    split = store.put_bytes(lines.encode())
    settings = dict(base_model=tiny_bert, batch_size=40, learning_rate=1e-2, max_length=16, seed=2, epochs=120,
                    eval_every_steps=20, patience=None)
    settings.update(overrides)
    plan = RunPlan(locator="jsonl:/x.jsonl", target="t", recipe="seqcls-lora-minilm", recipe_overrides=settings)
    test_set = contract_events.TestSetRef(target="t", sha256=split.sha256, rows=len(texts), artifact=split,
                                          origin="first_run", frozen_by_run_id="run-0")
    payload = PrepPrepared(plan=plan, manifest=ref("m"), train=split, eval=split, label_space=LABEL_SPACE,
                           train_rows=len(texts), eval_rows=len(texts), dataset_version="v1", test=split,
                           test_rows=len(texts), test_set=test_set)
    return envelope(payload, run_id=run_id, producer="prep")


def start_trainer(nats_url: str, data_dir: Path, log_path: Path, ack_wait_s: str | None = "4") -> subprocess.Popen:
    env = {**os.environ, "NATS_URL": nats_url, "TUNELINE_DATA_DIR": str(data_dir),
           **({"TUNELINE_TRAINER_ACK_WAIT_S": ack_wait_s} if ack_wait_s else {}), "TUNELINE_TRAINER_PROGRESS_EVERY_S": "0",
           "TUNELINE_TRAINER_NACK_BACKOFF_S": "[0.5]", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "services.trainer"], cwd=ROOT, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


async def events(js, type_name: str, run_id: str) -> list:
    info = await js.stream_info(subjects.STREAM)
    out = []
    subject = subjects.subject_for(type_name, kind="event")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=None)
        except Exception:  # noqa: BLE001
            continue
        if msg.subject == subject:
            env, payload = decode(msg.data)
            if env.run_id == run_id:
                out.append(payload)
    return out


async def command(js, cmd, run_id: str) -> None:
    env = envelope(cmd, run_id=run_id, producer="cli")
    await publish(js, env, subjects.subject_for(env.type, kind="command"))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigkill_mid_run_resumes_from_the_last_checkpoint(js, nats_server, tiny_bert, tmp_path):
    data_dir = tmp_path / "data"
    env = prepared(data_dir, tiny_bert, "run-crash")
    first = start_trainer(nats_server.url, data_dir, tmp_path / "trainer1.log")
    try:
        await publish(js, env, subjects.subject_for("prep.prepared", kind="event"))
        ckpts = await wait_for(lambda: _at_least(js, "training.checkpointed", "run-crash", 2), timeout=120)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_after = max(c.step for c in ckpts)
    progressed_before = {p.step for p in await events(js, "training.progress", "run-crash")}

    second = start_trainer(nats_server.url, data_dir, tmp_path / "trainer2.log")
    try:
        done = await wait_for(lambda: _at_least(js, "training.completed", "run-crash", 1), timeout=240)
    finally:
        stop(second)
    completed = done[0]
    started = await events(js, "training.started", "run-crash")
    assert [s.resumed_from_step for s in started] == [None, completed.resumed_from_step]
    restarted = await events(js, "training.restarted", "run-crash")
    assert [(r.delivery, r.resumed_from_step) for r in restarted] == [(2, completed.resumed_from_step)]
    # it resumed at (or after) the last checkpoint announced before the kill: those steps were not repeated
    assert completed.resumed_from_step >= killed_after > 0
    assert completed.steps == 120
    assert completed.best_step is not None and completed.adapter is not None
    # nothing was lost: every step has its progress event; the only steps reported twice are those the
    # second attempt trained again (after its checkpoint, up to where the first one was killed)
    progress = [p.step for p in await events(js, "training.progress", "run-crash")]
    assert sorted(set(progress)) == list(range(1, 121))
    repeated = {step for step in progress if progress.count(step) > 1}
    assert all(completed.resumed_from_step < step <= max(progressed_before) for step in repeated)
    assert max(progressed_before) >= killed_after
    assert not (data_dir / "trainer" / "work" / str(env.event_id)).exists()  # checkpoints cleaned after completion


async def test_a_trainer_killed_before_its_first_checkpoint_retrains_visibly_and_resumes_within_seconds(
        js, nats_server, tiny_bert, tmp_path):
    """A trainer killed before its first checkpoint retrains from step 0 on redelivery: that attempt is in the
    audit trail (training.restarted naming the delivery, its own training.started and progress events),
    not dropped as duplicates of the first attempt's. With the default ack_wait and the handler's heartbeats,
    the restarted trainer's next event comes within 10 s of its restart (it took ~30 s with ack_wait 30 s)."""
    data_dir = tmp_path / "data"
    env = prepared(data_dir, tiny_bert, "run-early-kill", eval_every_steps=1000)  # no checkpoint before the end
    first = start_trainer(nats_server.url, data_dir, tmp_path / "trainer1.log", ack_wait_s=None)
    try:
        await publish(js, env, subjects.subject_for("prep.prepared", kind="event"))
        await wait_for(lambda: _at_least(js, "training.progress", "run-early-kill", 3), timeout=120)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    reported_before = len(await events(js, "training.progress", "run-early-kill"))
    restarted_at = time.monotonic()
    second = start_trainer(nats_server.url, data_dir, tmp_path / "trainer2.log", ack_wait_s=None)
    try:
        restarted = await wait_for(lambda: _at_least(js, "training.restarted", "run-early-kill", 1), timeout=60,
                                   interval=0.2)
        recovery_s = time.monotonic() - restarted_at
        done = await wait_for(lambda: _at_least(js, "training.completed", "run-early-kill", 1), timeout=240)
    finally:
        stop(second)
    print(f"recovery: the restarted trainer's first event {recovery_s:.1f} s after its restart")
    assert recovery_s < 10
    assert [(r.delivery, r.resumed_from_step) for r in restarted] == [(2, None)]
    started = await events(js, "training.started", "run-early-kill")
    assert [s.resumed_from_step for s in started] == [None, None]  # both attempts, from step 0
    progress = [p.step for p in await events(js, "training.progress", "run-early-kill")]
    assert progress[:reported_before] == list(range(1, reported_before + 1))
    assert progress[reported_before:] == list(range(1, 121))  # the second attempt, every step of it
    assert done[0].steps == 120 and done[0].resumed_from_step is None


async def _at_least(js, type_name: str, run_id: str, n: int):
    found = await events(js, type_name, run_id)
    return found if len(found) >= n else None


async def test_pause_resume_and_cancel_commands_reach_the_running_job(js, nats_server, tiny_bert, tmp_path):
    data_dir = tmp_path / "data"
    env = prepared(data_dir, tiny_bert, "run-ctl", epochs=1000, eval_every_steps=500)
    proc = start_trainer(nats_server.url, data_dir, tmp_path / "trainer.log")
    try:
        await publish(js, env, subjects.subject_for("prep.prepared", kind="event"))
        await wait_for(lambda: _at_least(js, "training.progress", "run-ctl", 3), timeout=120)
        await command(js, PauseTraining(requested_by="alice"), "run-ctl")
        paused = (await wait_for(lambda: _at_least(js, "training.paused", "run-ctl", 1), timeout=30))[0]
        assert paused.requested_by == "alice"
        steps_at_pause = len(await events(js, "training.progress", "run-ctl"))
        await asyncio.sleep(2.0)
        assert len(await events(js, "training.progress", "run-ctl")) == steps_at_pause  # nothing moves while paused
        await command(js, ResumeTraining(requested_by="alice"), "run-ctl")
        await wait_for(lambda: _at_least(js, "training.resumed", "run-ctl", 1), timeout=30)
        await wait_for(lambda: _at_least(js, "training.progress", "run-ctl", steps_at_pause + 3), timeout=60)
        await command(js, CancelTraining(requested_by="bob", reason="wrong data"), "run-ctl")
        failed = (await wait_for(lambda: _at_least(js, "training.failed", "run-ctl", 1), timeout=30))[0]
        assert "cancelled by bob" in failed.message
        msgs = await _envelopes(js, "training.failed", "run-ctl")
        assert msgs[0].reason_code == "training.cancelled"
        assert not await events(js, "training.completed", "run-ctl")
    finally:
        stop(proc)


async def _envelopes(js, type_name: str, run_id: str) -> list:
    info = await js.stream_info(subjects.STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.STREAM, seq)
        if msg.subject == subjects.subject_for(type_name, kind="event"):
            env, _ = decode(msg.data)
            if env.run_id == run_id:
                out.append(env)
    return out


async def test_strict_preflight_blocks_before_training(js, nats_server, tiny_bert, tmp_path):
    data_dir = tmp_path / "data"
    # chat SFT on an encoder: a capability blocker; no training may start
    env = prepared(data_dir, tiny_bert, "run-blocked")
    payload = env.payload
    payload["plan"]["recipe_overrides"]["max_length"] = 100_000  # over the recipe's limit: recipe_invalid
    bad = env.model_copy(update={"payload": payload})
    proc = start_trainer(nats_server.url, data_dir, tmp_path / "trainer.log")
    try:
        await publish(js, bad, subjects.subject_for("prep.prepared", kind="event"))
        failed = await wait_for(lambda: _envelopes_nonempty(js, "training.failed", "run-blocked"), timeout=60)
        assert failed[0].reason_code == "training.recipe_invalid"
        assert "max_length" in failed[0].payload["message"]

        env2 = prepared(data_dir, tiny_bert, "run-mem", batch_size=40, max_length=512)
        p2 = env2.payload
        p2["plan"]["recipe_overrides"]["base_model"] = str(tmp_path / "no-such-model")
        await publish(js, env2.model_copy(update={"payload": p2}), subjects.subject_for("prep.prepared", kind="event"))
        blocked = await wait_for(lambda: _envelopes_nonempty(js, "preflight.blocked", "run-mem"), timeout=60)
        assert blocked[0].reason_code == "preflight.blocked"
        codes = [b["reason_code"] for b in blocked[0].payload["blockers"]]
        assert "preflight.base_model_unavailable" in codes
        assert not await events(js, "training.started", "run-mem")
    finally:
        stop(proc)


async def _envelopes_nonempty(js, type_name: str, run_id: str):
    found = await _envelopes(js, type_name, run_id)
    return found or None


async def test_chat_sft_run_trains_on_a_causal_lm(js, nats_server, tmp_path):
    from contracts.common import FieldMapping
    from tests.tiny_models import build_tiny_llama, colour_conversations

    llama = build_tiny_llama(tmp_path / "llama")
    data_dir = tmp_path / "data"
    store = ArtifactStore((data_dir / "artifacts").resolve())
    rows = colour_conversations()
    split = store.put_bytes("".join(json.dumps(r) + "\n" for r in rows).encode())
    plan = RunPlan(locator="jsonl:/chats.jsonl", target="bot", mapping=FieldMapping(shape="chat_messages", messages="m"),
                   recipe_overrides=dict(base_model=llama, max_length=64, batch_size=24, learning_rate=2e-2, epochs=20,
                                         eval_every_steps=5, patience=None))
    payload = PrepPrepared(plan=plan, manifest=ref("m"), train=split, eval=split, label_space=[],
                           train_rows=len(rows), eval_rows=len(rows), dataset_version="v1")
    proc = start_trainer(nats_server.url, data_dir, tmp_path / "trainer.log")
    try:
        await publish(js, envelope(payload, run_id="run-chat", producer="prep"),
                      subjects.subject_for("prep.prepared", kind="event"))
        done = (await wait_for(lambda: _at_least(js, "training.completed", "run-chat", 1), timeout=120))[0]
    finally:
        stop(proc)
    assert done.recipe == "chat-sft-lora" and done.task == "chat_sft" and done.metric_name == "neg_eval_loss"
    ckpts = await events(js, "training.checkpointed", "run-chat")
    assert ckpts[-1].eval_loss < ckpts[0].eval_loss
    passed = (await events(js, "preflight.passed", "run-chat"))[0]
    assert passed.train_plan.task == "chat_sft"


async def test_redelivery_after_completion_republishes_the_completion_without_training(js, nats_server, tiny_bert,
                                                                                        tmp_path):
    """The handler finished (training.completed published) but the ack never reached the server: the
    same prep.prepared comes again. It must not train from step 0 (its checkpoints are gone) nor publish
    anything new: only the identical training.completed, which the stream deduplicates, or which
    downstream stages recognise by its id after the duplicate window."""
    import nats

    from contracts.registry import encode
    from services.common.delivery import StageContext
    from services.trainer.app import make_on_prepared, work_dir_for
    from services.trainer.completion import completion_record_path
    from services.trainer.control import ControlRegistry
    from services.trainer.settings import TrainerSettings

    data_dir = tmp_path / "data"
    env = prepared(data_dir, tiny_bert, "run-again", epochs=20, eval_every_steps=10)
    settings = TrainerSettings(nats_url=nats_server.url, data_dir=data_dir, progress_every_s=0)
    store = ArtifactStore((data_dir / "artifacts").resolve())
    handler = make_on_prepared(settings, ControlRegistry())

    nc = await nats.connect(nats_server.url)
    published: list[tuple[str, bytes]] = []  # every publish, duplicates included (core NATS sees them all)

    async def seen(msg) -> None:
        published.append((msg.subject, msg.data))

    await nc.subscribe(f"{subjects.EVENTS}.>", cb=seen)
    await nc.flush()

    async def deliver() -> None:
        _, payload = decode(encode(env))
        await handler(StageContext(env, payload, "trainer", js, store, settings, HeartbeatOnlyMsg()))

    try:
        await deliver()
        completed_subject = subjects.subject_for("training.completed", kind="event")
        await wait_for(lambda: any(s == completed_subject for s, _ in published))
        first = list(published)
        assert [s for s, _ in first].count(subjects.subject_for("training.progress", kind="event")) == 20
        assert not work_dir_for(settings, env.event_id).exists()  # the checkpoints are removed after completion
        assert completion_record_path(data_dir, env.event_id).is_file()

        started = time.monotonic()
        await deliver()  # the redelivery
        elapsed = time.monotonic() - started
        await wait_for(lambda: len(published) > len(first))
        await nc.flush()
        await asyncio.sleep(0.2)
        again = published[len(first):]
    finally:
        await nc.close()

    original = [d for s, d in first if s == completed_subject]
    assert len(original) == 1
    # nothing but the same training.completed, byte for byte: same id, payload and adapter artifact
    assert again == [(completed_subject, original[0])]
    assert elapsed < 5
    done = await events(js, "training.completed", "run-again")
    assert len(done) == 1 and done[0].steps == 20 and done[0].resumed_from_step is None
    trigger = decode(encode(env))[1]  # the splits the evaluator needs travel on from prep.prepared (D14)
    assert (done[0].train, done[0].test, done[0].test_set) == (trigger.train, trigger.test, trigger.test_set)
    assert store.path(done[0].adapter).exists()  # the adapter it names is still in the artifact store
    assert len(await events(js, "training.started", "run-again")) == 1
