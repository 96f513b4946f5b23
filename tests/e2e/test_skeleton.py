"""The walking skeleton end to end, through the CLI a user types: `tuneline up`, a run through all
six services, its timeline and events, a failing run, a poison message, rebuild, status, `down`."""

from __future__ import annotations

import json
import re

import pytest

from services.cli import stack

pytestmark = [pytest.mark.e2e, pytest.mark.connected]

PIPELINE = ["run.start", "ingest.committed", "prep.test_set_frozen", "prep.cleaned", "prep.prepared",
            "preflight.passed", "training.started", "training.completed", "judge.validated", "eval.gate_decided",
            "eval.completed", "export.completed",
            "registry.version_registered"]
TRAINING_DETAIL = ("training.progress", "training.checkpointed")


def _run_id(stdout: str) -> str:
    return next(w for w in stdout.split() if w.startswith("run-"))


def test_a_run_flows_through_all_six_services_and_its_audit_trail_tells_the_story(cli):
    sample = cli.data / "sample.jsonl"
    cli("sample-data", str(sample), "--rows-per-label", "40")
    proc = cli("run", "--locator", f"jsonl:{sample}", "--target", "support-tickets", "--max-steps", "30")
    run_id = _run_id(proc.stdout)
    assert "status=SUCCEEDED" in proc.stdout
    assert re.search(r"trainer\s+step\s+\d+/30", proc.stdout)  # training progress shown while waiting

    events = json.loads(cli("events", "--run", run_id, "--json").stdout)
    types = [e["type"] for e in events]
    # the gate's decision makes the registered candidate validated or rejected (whichever the run earned)
    verdict = "registry.validated" if "registry.validated" in types else "registry.rejected"
    assert [t for t in types if t not in TRAINING_DETAIL] == PIPELINE + [verdict], " ".join(
        f"{e['global_position']}:{t}" for e, t in zip(events, types))
    assert types.count("training.progress") >= 3
    assert types.count("training.checkpointed") >= 2  # one per mid-training evaluation
    steps = [e["payload"]["step"] for e in events if e["type"] in TRAINING_DETAIL]
    assert steps == sorted(steps)  # published in the order they happened
    positions = [e["global_position"] for e in events]
    assert positions == sorted(positions)
    assert {e["correlation_id"] for e in events} == {run_id}
    by_id = {e["event_id"]: e for e in events}
    for e in events[1:]:
        assert e["causation_id"] in by_id, f"{e['type']} is not caused by an event of the run"

    committed = next(e for e in events if e["type"] == "ingest.committed")["payload"]
    assert committed["rows_read"] == committed["rows_accepted"] + committed["rows_rejected"] == 163
    assert committed["rejected_by_reason"] == {"ingest.unparseable_row": 1, "ingest.empty_text": 1,
                                               "ingest.missing_field": 1}
    # the target's first run froze its test set (D14); training saw train and validation, never test
    frozen = next(e for e in events if e["type"] == "prep.test_set_frozen")["payload"]["test_set"]
    prepared = next(e for e in events if e["type"] == "prep.prepared")["payload"]
    completed = next(e for e in events if e["type"] == "training.completed")["payload"]
    assert frozen["origin"] == "first_run" and frozen["frozen_by_run_id"] == run_id
    assert prepared["test_set"] == completed["test_set"] == frozen and prepared["test"]["sha256"] == frozen["sha256"]
    assert prepared["test_rows"] > 0 and len({prepared["train"]["sha256"], prepared["eval"]["sha256"], frozen["sha256"]}) == 3
    # judged on the frozen test set against the classical baseline trained on the same train split (D15)
    evaluated = next(e for e in events if e["type"] == "eval.completed")["payload"]
    gate = next(e for e in events if e["type"] == "eval.gate_decided")["payload"]
    assert evaluated["baseline_kind"] == gate["baseline_kind"] == "classical"
    assert evaluated["test_set_sha256"] == gate["test_set_sha256"] == frozen["sha256"]
    assert gate["evidence"]["n"] == evaluated["candidate_report"]["n"] == prepared["test_rows"]
    # the sample is hard enough that the baseline does not score 1.0 (there is something to decide)
    assert 0.4 < evaluated["baseline_report"]["metrics"]["accuracy"] < 1.0
    assert gate["passed"] == (not gate["failed"]) == evaluated["gate_passed"]
    assert ("gate passed" if gate["passed"] else "gate failed") in proc.stdout  # the decision, in words
    shown = cli("eval", "show", run_id).stdout
    assert "candidate vs classical baseline" in shown and "decision:" in shown
    registered = next(e for e in events if e["type"] == "registry.version_registered")["payload"]
    assert registered["target"] == "support-tickets" and registered["status"] == "candidate"
    assert (verdict == "registry.validated") == gate["passed"]

    # The export is real safetensors whose sha256s match the export manifest: the single-label default
    # (seqcls-full-minilm) trains every weight, so it ships the whole model rather than a LoRA adapter.
    exported = next(e for e in events if e["type"] == "export.completed")["payload"]
    from services.common.artifacts import ArtifactStore
    from contracts.common import ArtifactRef
    from services.export.domain import smoke_load, verify_export

    out = ArtifactStore(cli.data / "artifacts").materialize_dir(ArtifactRef(**exported["export"]), cli.data / "x")
    assert (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "labels.json").read_text())["method"] == "full" and verify_export(out) == []
    assert smoke_load(out) > 0
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == exported["files"]

    timeline = json.loads(cli("timeline", run_id, "--json").stdout)
    assert timeline["run"]["status"] == "succeeded"
    assert [s["stage"] for s in timeline["stages"]] == ["ingest", "prep", "trainer", "evaluator", "export", "registry"]
    assert all(s["status"] == "succeeded" for s in timeline["stages"])


@pytest.mark.parametrize("locator, reason", [
    ("jsonl:{data}/not-here.jsonl", "ingest.source_not_found"),
    ("jsonl:/definitely/not/here.jsonl", "ingest.locator_outside_roots"),  # the data dir is the allowed root
    ("no-scheme-here", "ingest.locator_invalid"),
])
def test_a_bad_locator_fails_the_run_at_ingest_with_a_clear_reason(cli, locator, reason):
    locator = locator.format(data=cli.data)
    proc = cli("run", "--locator", locator, "--target", "t", check=False, timeout=120)
    assert proc.returncode == 1
    assert "status=FAILED" in proc.stdout and reason in proc.stdout
    timeline = json.loads(cli("timeline", _run_id(proc.stdout), "--json").stdout)
    assert timeline["run"]["reason_code"] == reason
    assert timeline["stages"] == [timeline["stages"][0]] and timeline["stages"][0]["stage"] == "ingest"


def test_a_poison_message_is_dead_lettered_and_shows_in_the_timeline(cli):
    import asyncio

    import nats

    state = stack.read_state(cli.data)

    async def send():
        # the stack's nats-server has a user per service (services/common/nats_auth.py): poison as admin
        nc = await nats.connect(stack.client_nats_url(cli.data, state["nats"]["url"], state, "admin"))
        await nc.jetstream().publish("tuneline.evt.prep.prepared", json.dumps({"run_id": "run-poisoned", "type": 7}).encode(),
                                     headers={"Nats-Msg-Id": "poison-1"})
        await nc.close()

    asyncio.run(send())
    import time

    deadline = time.monotonic() + 60
    while True:
        proc = cli("timeline", "run-poisoned", "--json", check=False)
        if proc.returncode == 0:
            tl = json.loads(proc.stdout)
            consumers = {e["summary"].split()[1] for e in tl["entries"] if e["type"] == "bus.message_dead_lettered"}
            if {"trainer-prep-prepared", "audit-recorder"} <= consumers:
                break
        assert time.monotonic() < deadline, "dead letters did not reach the timeline"
        time.sleep(0.5)
    assert tl["run"]["status"] == "failed" and tl["run"]["reason_code"] == "bus.malformed_message"
    status = json.loads(cli("status", "--json").stdout)
    assert status["stream"]["dlq_messages"] >= 2
    assert all(s["alive"] for s in status["services"].values())  # nothing crashed


def test_rebuild_reproduces_the_timeline_and_the_recorder_has_no_lag(cli):
    assert "identical to the live projection" in cli("rebuild", "timeline").stdout
    status = json.loads(cli("status", "--json").stdout)
    assert status["recorder"]["gaps"] == []
    assert status["projection"]["error_position"] is None
