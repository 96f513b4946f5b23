"""The evaluator service on a real nats-server: a hosted fine-tune (asked through the real openai SDK
against a fake of the documented chat completions API) against the classical baseline trained on the
run's own train split; judge validation, the gate's decision re-derived from the per-row records
alone, and the named failures of bad input."""

from __future__ import annotations

import json
import random

import pytest

from contracts import subjects
from contracts.common import EvaluationSettings, GateSettings, HostedSettings, RunPlan
from contracts.events import TrainingCompleted
from contracts.registry import decode
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from services.common.jsonl import loads_jsonl
from services.evaluator import app as evaluator_app
from services.evaluator.adapters.chat import ChatClient
from services.evaluator.gate import GatePolicy, decide
from services.evaluator.settings import EvaluatorSettings
from tests.conftest import wait_for
from tests.factories import envelope, ref
from tests.unit.test_eval_chat import OPENAI_KEY, FakeChatProvider, http

pytestmark = pytest.mark.connected

FT_MODEL = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
LABELS = ["neg", "pos"]
POS = ["good", "great", "lovely", "superb", "fine"]
NEG = ["awful", "bad", "dull", "poor", "boring"]
FILLER = ["film", "plot", "acting", "ending", "cast", "score", "story", "pace"]


def _rows(n: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = [rng.choice(POS if label == "pos" else NEG)] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"row_number": i, "row_id": f"{prefix}{i}", "text": " ".join(words), "label": label,
                     "heads": {"genre": "drama" if i % 3 else "comedy"}})
    return rows


def _completed(tmp_path, run_id: str, *, test_rows=None, model: str = FT_MODEL) -> object:
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    put = lambda rows: store.put_bytes(("".join(json.dumps(r) + "\n" for r in rows)).encode())  # noqa: E731
    # a small train split: the classical baseline sees few of the sentiment words with each filler
    train, validation, test = _rows(16, 1, "t"), _rows(8, 2, "v"), test_rows or _rows(120, 3, "x")
    plan = RunPlan(locator="jsonl:/x.jsonl", target="reviews", backend="openai", hosted=HostedSettings(),
                   evaluation=EvaluationSettings(gate=GateSettings(bucket_fields=["genre"])))
    payload = TrainingCompleted(
        plan=plan, base_model="gpt-4o-mini-2024-07-18", adapter=None, manifest=ref("m"), eval=put(validation),
        label_space=LABELS, steps=10, final_loss=0.1, examples_per_s=None, wall_s=1.0, backend="openai",
        fine_tuned_model=model, train=put(train), test=put(test))
    return envelope(payload, run_id=run_id, producer="trainer")


@pytest.fixture
def provider(monkeypatch):
    def answer(body: dict) -> str:  # the fine-tune knows every sentiment word
        last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        return "pos" if any(w in last.split() for w in POS) else "neg"

    fake = FakeChatProvider("openai", models=(FT_MODEL,), answer=answer)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)

    def client(p):
        return ChatClient("openai", p.fine_tuned_model, http_client=http.Client(transport=fake.transport()),
                          sleep=lambda s: None)

    monkeypatch.setattr(evaluator_app, "_hosted_client", client)
    return fake


async def _run(js, nats_server, tmp_path, env, until: str) -> dict:
    svc = evaluator_app.build(EvaluatorSettings(nats_url=nats_server.url, data_dir=tmp_path / "data"))
    await svc.prepare_broker()
    await svc.broker.start()
    try:
        await publish(js, env, subjects.subject_for("training.completed", kind="event"))

        async def found():
            info = await js.stream_info(subjects.STREAM)
            out = {}
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(subjects.STREAM, seq)
                assert OPENAI_KEY.encode() not in msg.data  # the key never reaches the bus
                e, payload = decode(msg.data)
                if e.run_id == env.run_id:
                    out[e.type] = (e, payload)
            return out if until in out else None

        return await wait_for(found, timeout=120)
    finally:
        await svc.broker.stop()


async def test_a_hosted_candidate_is_judged_against_the_classical_baseline_and_the_gate_rederives(
        js, nats_server, tmp_path, provider):
    events = await _run(js, nats_server, tmp_path, _completed(tmp_path, "run-eval-hosted"), "eval.completed")
    judge = events["judge.validated"][1]
    gate_env, gate = events["eval.gate_decided"]
    _, done = events["eval.completed"]
    assert judge.passed and judge.accuracy == 1.0
    assert gate.baseline_kind == "classical" and gate.baseline == "classical:tfidf-logreg"
    assert done.baseline_kind == "classical" and done.gate_passed == gate.passed
    assert done.candidate_report.n == 120 and done.candidate_report.metrics["accuracy"] == 1.0
    assert done.candidate_report.tokens_median is not None and done.candidate_report.usd_per_1k is not None
    # the fake answered every test row once, through chat completions, at temperature 0
    asked = [b for b in provider.bodies if b["model"] == FT_MODEL]
    assert len(asked) == 120 and all(b.get("temperature") == 0 for b in asked)

    # D16: the decision re-derives from the per-row artifact and the event alone
    store = ArtifactStore((tmp_path / "data" / "artifacts").resolve())
    records = loads_jsonl(store.read_bytes(gate.records))
    cand = [r for r in records if r["model"] == "candidate"]
    base = {r["row_id"]: r for r in records if r["model"] == gate.baseline}
    policy = GatePolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in gate.evidence["policy"].items()})
    again = decide([r["judge_score"] for r in cand], [base[r["row_id"]]["judge_score"] for r in cand],
                   [r["row_id"] for r in cand], [r["buckets"] for r in cand], policy)
    assert again.as_evidence() | {"policy": policy.as_dict()} == gate.evidence
    assert again.passed == gate.passed
    assert {"genre=drama", "genre=comedy", "class=pos", "class=neg"} <= set(gate.evidence["buckets"])
    # the baseline really is a baseline: it learned something from 16 rows, and it is not the candidate
    assert 0.5 <= done.baseline_report.metrics["accuracy"] < 1.0
    assert gate.passed, gate.failed


async def test_a_hosted_model_that_does_not_exist_fails_the_evaluation_by_name(js, nats_server, tmp_path, provider):
    env = _completed(tmp_path, "run-eval-404", model="ft:gpt-4o-mini-2024-07-18:acme::gone")
    events = await _run(js, nats_server, tmp_path, env, "eval.failed")
    failed_env, _ = events["eval.failed"]
    assert failed_env.reason_code == "eval.model_not_found"
    assert "eval.completed" not in events and "eval.gate_decided" not in events


async def test_a_test_set_with_a_label_the_candidate_never_learned_is_refused(js, nats_server, tmp_path, provider):
    rows = _rows(20, 3, "x") + [{"row_number": 99, "row_id": "odd", "text": "meh film", "label": "mixed"}]
    events = await _run(js, nats_server, tmp_path, _completed(tmp_path, "run-eval-labels", test_rows=rows),
                        "eval.failed")
    failed_env, failure = events["eval.failed"]
    assert failed_env.reason_code == "eval.label_space_mismatch"
    assert "mixed" in failure.message


PROD_MODEL = "ft:gpt-4o-mini-2024-07-18:acme::prod01"


async def test_the_candidate_is_compared_with_what_serves_the_target_and_production_is_scored_once(
        js, nats_server, tmp_path, monkeypatch):
    from services.common import serving

    def answer(body: dict) -> str:  # production knows two sentiment words, the candidate all of them
        last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"].split()
        words = POS if body["model"] == FT_MODEL else POS[:2]
        return "pos" if any(w in last for w in words) else "neg"

    fake = FakeChatProvider("openai", models=(FT_MODEL, PROD_MODEL), answer=answer)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    real_client = ChatClient

    def client(provider, model, **kw):
        return real_client(provider, model, http_client=http.Client(transport=fake.transport()), sleep=lambda s: None)

    monkeypatch.setattr(evaluator_app, "_hosted_client", lambda p: client("openai", p.fine_tuned_model))
    monkeypatch.setattr("services.evaluator.adapters.chat.ChatClient", client)
    # what the registry projects into `serving` when v3 of the target is production (services/registry/domain.py)
    kv = await serving.serving_bucket(js)
    await kv.put("reviews", json.dumps({"target": "reviews", "version": 3, "hosted_model": PROD_MODEL,
                                        "model_uri": None, "base_model": {"model": "gpt-4o-mini", "sha256": None},
                                        "rollout_percent": 100, "log_sequence": 1}).encode())

    try:
        await _production_then_cache(js, nats_server, tmp_path, fake)
    finally:
        await kv.delete("reviews")  # the stack is shared with other tests


async def _production_then_cache(js, nats_server, tmp_path, fake):
    events = await _run(js, nats_server, tmp_path, _completed(tmp_path, "run-eval-prod-1"), "eval.completed")
    _, gate = events["eval.gate_decided"]
    _, done = events["eval.completed"]
    assert gate.baseline_kind == done.baseline_kind == "production" and gate.baseline == "production:v3"
    assert done.baseline_report.metrics["baseline"] == {"version": 3, "source_run_id": None, "cached": False}
    assert done.candidate_report.metrics["accuracy"] == 1.0 > done.baseline_report.metrics["accuracy"]
    asked_production = sum(b["model"] == PROD_MODEL for b in fake.bodies)
    assert asked_production == 120

    # a second candidate on the same frozen test set: production's answers come from the cache
    events = await _run(js, nats_server, tmp_path, _completed(tmp_path, "run-eval-prod-2"), "eval.completed")
    _, again = events["eval.completed"]
    assert again.baseline_kind == "production" and again.baseline_report.metrics["baseline"]["cached"] is True
    assert sum(b["model"] == PROD_MODEL for b in fake.bodies) == asked_production
    assert again.baseline_report.judge_mean == done.baseline_report.judge_mean


async def test_a_production_version_whose_export_is_gone_fails_by_name_and_records_nothing_else(
        js, nats_server, tmp_path, provider):
    from services.common import serving

    kv = await serving.serving_bucket(js)
    gone = "0" * 64
    await kv.put("reviews", json.dumps({"target": "reviews", "version": 7, "hosted_model": None,
                                        "model_uri": f"file:///nowhere/{gone}", "model_sha256": gone, "model_size": 10,
                                        "base_model": {"model": "all-MiniLM-L6-v2", "sha256": None},
                                        "rollout_percent": 100, "log_sequence": 9}).encode())
    try:
        events = await _run(js, nats_server, tmp_path, _completed(tmp_path, "run-eval-prod-gone"), "eval.failed")
    finally:
        await kv.delete("reviews")
    failed_env, failure = events["eval.failed"]
    assert failed_env.reason_code == "eval.production_unavailable"
    assert "production:v7" in failure.message
    assert not {"judge.validated", "eval.gate_decided", "eval.completed"} & set(events)
