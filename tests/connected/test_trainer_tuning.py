"""A tuned run (plan.tuning) in the trainer service, as its own process, against a real nats-server: SIGKILL
after the first trial, and the redelivered trigger's new trainer reports the recorded trial again under the
same event id (the stream holds it once), trains only the trials left, then takes the winner's training over
as the final model (not trained again). Tuning reads the train and validation splits, never the test set."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from contracts import events as contract_events  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.common import RunPlan, TuningSettings  # noqa: E402
from contracts.events import PrepPrepared  # noqa: E402
from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.bus import publish  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.connected.test_trainer_service import _at_least, events, start_trainer, stop  # noqa: E402
from tests.factories import envelope, ref  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402

pytestmark = [pytest.mark.connected, pytest.mark.slow]  # two trainer processes, four trainings: ~2 min here
RUN = "run-tuned-crash"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tuned_prepared(data_dir: Path, tiny_bert: str):
    store = ArtifactStore((data_dir / "artifacts").resolve())
    texts, labels = sentiment_rows()
    rows = [{"row_number": i, "text": t, "label": lab} for i, (t, lab) in enumerate(zip(texts, labels))]

    def put(part: list[dict]):
        return store.put_bytes("".join(json.dumps(r) + "\n" for r in part).encode())

    train, validation, test = put(rows[::2]), put(rows[1::2]), put(rows[1::4])
    settings = dict(base_model=tiny_bert, batch_size=20, learning_rate=1e-2, max_length=16, seed=2, epochs=12,
                    eval_every_steps=4, patience=None, warmup_ratio=0.0)
    plan = RunPlan(locator="jsonl:/x.jsonl", target="t", recipe="seqcls-lora-minilm", recipe_overrides=settings,
                   tuning=TuningSettings(trials=3, budget_minutes=30,
                                         space={"learning_rate": [1e-2, 3e-2, 3e-3]}))
    test_set = contract_events.TestSetRef(target="t", sha256=test.sha256, rows=10, artifact=test, origin="first_run",
                                          frozen_by_run_id="run-0")
    payload = PrepPrepared(plan=plan, manifest=ref("m"), train=train, eval=validation, label_space=LABEL_SPACE,
                           train_rows=20, eval_rows=20, dataset_version="v1", test=test, test_rows=10, test_set=test_set)
    return envelope(payload, run_id=RUN, producer="prep"), payload


def log_events(path: Path, event: str) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


async def test_a_killed_tuned_run_reports_its_trials_once_and_trains_only_the_rest(js, nats_server, tiny_bert, tmp_path):
    data_dir = tmp_path / "data"
    env, prepared = tuned_prepared(data_dir, tiny_bert)
    first = start_trainer(nats_server.url, data_dir, tmp_path / "trainer1.log")
    try:
        await publish(js, env, subjects.subject_for("prep.prepared", kind="event"))
        await wait_for(lambda: _at_least(js, "training.trial_completed", RUN, 1), timeout=180)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    trained_first = {r["trial"] for r in log_events(tmp_path / "trainer1.log", "trial_started")}

    second = start_trainer(nats_server.url, data_dir, tmp_path / "trainer2.log")
    try:
        done = await wait_for(lambda: _at_least(js, "training.completed", RUN, 1), timeout=300)
    finally:
        stop(second)
    trials = await events(js, "training.trial_completed", RUN)
    assert [t.trial for t in trials] == [1, 2, 3]  # trial 1, published again by the second trainer, is stored once
    assert trials[0].settings == {"learning_rate": 1e-2}  # the recipe's own settings first
    assert all(t.status == "completed" and t.metric is not None for t in trials)
    assert (await events(js, "training.restarted", RUN))[0].delivery == 2
    # the second trainer did not train trial 1 again: it reported the recorded one
    recorded = {r["trial"] for r in log_events(tmp_path / "trainer2.log", "trial_recorded_earlier")}
    trained_second = {r["trial"] for r in log_events(tmp_path / "trainer2.log", "trial_started")}
    assert 1 in trained_first and 1 in recorded and 1 not in trained_second
    assert trained_second <= {2, 3} and recorded | trained_second == {1, 2, 3}

    [tuned] = await events(js, "training.tuning_completed", RUN)
    best = max(trials, key=lambda t: (t.metric, -t.trial))
    assert (tuned.best_trial, tuned.best_settings) == (best.trial, best.settings)
    assert (tuned.train_sha256, tuned.validation_sha256) == (prepared.train.sha256, prepared.eval.sha256)
    assert prepared.test.sha256 not in (tuned.train_sha256, tuned.validation_sha256)
    # the final model is the winner's training, taken over, not trained again: training.started resumes at the
    # trial's last step and the exported checkpoint is the trial's best
    completed = done[0]
    assert tuned.final_from_trial == best.trial
    assert (completed.best_step, completed.best_metric) == (best.best_step, pytest.approx(best.metric))
    started = await events(js, "training.started", RUN)
    assert [s.resumed_from_step for s in started] == [best.steps] == [completed.steps]
    assert await events(js, "training.progressed", RUN) == []  # no step trained after the search
    assert not (data_dir / "trainer" / "work" / str(env.event_id)).exists()  # trials' checkpoints cleaned too
