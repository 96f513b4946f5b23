"""History, lineage and the gate replay against real PostgreSQL and nats-server: the History projection run
by the audit service and rebuilt identically, `tuneline history|lineage|replay gate` on recorded events, and
export reading the lineage back from the bus."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import orjson
import pytest

from contracts import subjects
from contracts.commands import CancelTraining
from contracts.envelope import Severity
from contracts.events import (GateDecided, Notice, PrepCleaned, PrepPrepared, TrainingCompleted, TrainingFailed,
                              VersionPromoted, VersionRejected, VersionValidated)
from services.audit.db import connect_as_app
from services.audit.projections import history
from services.cli import history_cmds, replay_cmds
from services.common.artifacts import ArtifactStore
from services.evaluator.gate import GatePolicy, decide
from tests.conftest import wait_for
from tests.connected.test_audit import _COLUMNS, _rows, publish_all, start_audit, stop_audit
from tests.factories import envelope, failed_run, plan, ref, successful_run

pytestmark = pytest.mark.connected

T = plan().target


def _run(run_id: str, version: int, dataset: str, train_rows: int, labels=("a", "b")) -> list:
    """A run through registration as `version`, prepared on `dataset`, with prep.cleaned."""
    envs = successful_run(run_id, progress_steps=1)
    i = next(i for i, e in enumerate(envs) if e.type == "prep.prepared")
    committed = envs[i - 1]
    envs[i] = envelope(PrepPrepared(plan=plan(), manifest=ref(f"m-{dataset}"), train=ref(f"t-{dataset}"), eval=ref("e"),
                                    label_space=list(labels), train_rows=train_rows, eval_rows=10, test_rows=20,
                                    dataset_version=dataset), run_id=run_id, causation=committed, producer="prep")
    envs.insert(i, envelope(PrepCleaned(plan=plan(), rows_in=train_rows + 30, rows_kept=train_rows + 30,
                                        dropped_by_reason={}, dropped=ref("dropped"), pii_by_kind={}, rows_with_pii=0),
                            run_id=run_id, causation=committed, producer="prep"))
    # training.completed names the manifest prep made: the lineage hop from the adapter to the dataset
    j = next(i for i, e in enumerate(envs) if e.type == "training.completed")
    tc = envs[j]
    envs[j] = tc.model_copy(update={"payload": {**tc.payload, "manifest": ref(f"m-{dataset}").model_dump()}})
    k = next(i for i, e in enumerate(envs) if e.type == "eval.completed")
    envs[k] = envs[k].model_copy(update={"causation_id": envs[j].event_id})
    reg = envs[-1]
    envs[-1] = reg.model_copy(update={"payload": {**reg.payload, "version": version,
                                                  "manifest": ref(f"m-{dataset}").model_dump(),
                                                  "dataset_version": dataset}})
    return envs


def _act(payload):
    return envelope(payload, run_id=f"registry-{uuid.uuid4().hex[:8]}", producer="registry")


def lifecycle() -> list:
    """v1 promoted then archived, v2 rejected by its gate, v3 on a new label space promoted; a failed run and a
    cancelled one."""
    envs = _run("run-1", 1, "d1", 160) + _run("run-2", 2, "d2", 200) + _run("run-3", 3, "d3", 220, labels=("a", "b", "c"))
    envs += [
        _act(VersionValidated(target=T, version=1, gate_event_id="g1", actor="registry:gate", reason="gate passed")),
        _act(VersionRejected(target=T, version=2, actor="registry:gate", reason="gate.not_significant: p 0.41")),
        _act(VersionPromoted(target=T, version=1, actor="alice", reason="beats the classical baseline")),
        _act(VersionValidated(target=T, version=3, gate_event_id="g3", actor="registry:gate", reason="gate passed")),
        _act(VersionPromoted(target=T, version=3, demoted=1, actor="bob", reason="three classes now")),
    ]
    envs += failed_run("run-4")
    started = successful_run("run-5")[:4]
    envs += started + [
        envelope(CancelTraining(requested_by="dave", reason="wrong data"), run_id="run-5", producer="cli"),
        envelope(TrainingFailed(stage="trainer", message="cancelled by dave"), run_id="run-5", producer="trainer",
                 severity=Severity.ERROR, reason_code="training.cancelled"),
    ]
    return envs


def _publish_subject(env):
    kind = "command" if env.type in ("run.start", "training.cancel") else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


async def _at(conn, position):
    return await conn.fetchval("SELECT position FROM projection_checkpoints WHERE projection = 'history'") == position


def _cli_env(monkeypatch, database, nats_url="nats://127.0.0.1:1"):
    monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("NATS_URL", nats_url)
    return sys.modules["services.cli.main"] if "services.cli.main" in sys.modules else __import__(
        "services.cli.main", fromlist=["main"])


async def test_the_audit_service_projects_history_and_a_rebuild_in_any_batch_size_is_identical(
        js, nats_server, database, tmp_path, monkeypatch, capsys):
    from services.common.bus import publish

    envs = lifecycle()
    for env in envs:
        await publish(js, env, _publish_subject(env))
    svc = await start_audit(nats_server, database, tmp_path, projector_batch=7)  # batches split runs on purpose
    conn = await connect_as_app(database)
    try:
        await wait_for(lambda: _at(conn, len(envs)))
        live = await history.snapshot(conn)
        h = await history.target_history(conn, T)
        assert await history.rebuild(conn, batch_size=1000) == len(envs)
        assert await history.snapshot(conn) == live
        await history.rebuild(conn, batch_size=1)
        assert await history.snapshot(conn) == live
    finally:
        await conn.close()
        await stop_audit(svc)
    runs = {r["run_id"]: r for r in h["runs"]}
    assert {k: (r["status"], r["outcome"]) for k, r in runs.items()} == {
        "run-1": ("archived", "promoted"), "run-2": ("rejected", "rejected"), "run-3": ("production", "promoted"),
        "run-4": ("failed", "abandoned"), "run-5": ("cancelled", "abandoned")}
    assert runs["run-1"]["restore"] == f'tuneline restore {T} 1 --reason "..."' and runs["run-3"]["restore"] is None
    assert runs["run-2"]["rejection_reason"] == "gate.not_significant: p 0.41"
    assert [(a["type"], a["actor"]) for a in runs["run-1"]["acts"]] == [
        ("registry.validated", "registry:gate"), ("registry.promoted", "alice"), ("registry.promoted", "bob")]
    assert [runs[k]["dataset_semver"] for k in ("run-1", "run-2", "run-3")] == ["1.0.0", "1.1.0", "2.0.0"]
    # run-5 went back to two labels: another major version, not 1.x again
    assert [d["semver"] for d in h["datasets"]] == ["1.0.0", "1.1.0", "2.0.0", "3.0.0"]
    assert runs["run-1"]["train_rows"] == 160 and runs["run-1"]["accuracy"] == 0.9
    assert runs["run-5"]["acts"][0]["actor"] == "dave" and runs["run-5"]["reason_code"] == "training.cancelled"

    # the CLI: `tuneline rebuild history` compares with the live rows; `tuneline history` prints them
    main = _cli_env(monkeypatch, database)
    n, same, position = await main._rebuild("history")
    assert (n, same, position) == (len(envs), True, len(envs))
    args = argparse.Namespace(target=T, json=False)
    assert await asyncio.to_thread(history_cmds.cmd_history, main, args) == 0
    out = capsys.readouterr().out
    assert f"5 fine-tune run(s): 2 promoted, 1 rejected, 2 abandoned" in out
    assert f'archived: tuneline restore {T} 1 --reason "..."' in out and "promoted by bob: three classes now" in out
    assert await asyncio.to_thread(history_cmds.cmd_history, main, argparse.Namespace(target="nope", json=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tuneline history: [audit.history_target_not_found]")
    assert await asyncio.to_thread(history_cmds.cmd_history, main, argparse.Namespace(target=T, json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 5


async def test_lineage_walks_a_registered_version_back_to_its_source_by_sha256(database, monkeypatch, capsys):
    envs = lifecycle()
    conn = await connect_as_app(database)
    try:
        await conn.copy_records_to_table("run_events", records=_rows(envs, 1), columns=_COLUMNS)
        await history.catch_up(conn)
        lin = await history_cmds.read_lineage(conn, T, "v3", read_manifest=lambda r: {"source_sha256": ref("d").sha256})
        with pytest.raises(history_cmds.NotFound) as missing:
            await history_cmds.read_lineage(conn, T, "9")
        with pytest.raises(history_cmds.NotFound) as no_target:
            await history_cmds.read_lineage(conn, "no-such", "1")
    finally:
        await conn.close()
    hops = {h["hop"]: h for h in lin["hops"]}
    assert lin["run_id"] == "run-3" and lin["unresolved"] == []
    assert hops["export"]["sha256"] == ref("x").sha256 and hops["adapter"]["sha256"] == ref("a").sha256
    assert hops["dataset and manifest"]["sha256"] == ref("m-d3").sha256
    assert "dataset 2.0.0 (d3)" in hops["dataset and manifest"]["detail"]
    assert "the registration names this manifest" in hops["dataset and manifest"]["detail"]
    assert hops["accepted rows"]["by"] == "sha256" and hops["rejected rows"]["sha256"] == ref("r").sha256
    assert missing.value.reason_code == "registry.version_not_found"
    assert no_target.value.reason_code == "registry.target_not_found"
    main = _cli_env(monkeypatch, database)
    rc = await asyncio.to_thread(history_cmds.cmd_lineage, main, argparse.Namespace(target=T, version="0", json=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "[registry.version_not_found]" in err[0]


def _records_and_gate(store: ArtifactStore, run_id: str, better: int) -> GateDecided:
    records = []
    for i in range(60):
        b = {"class": "a" if i % 2 else "b"}
        records.append({"row_id": f"r{i}", "model": "candidate", "judge_score": 1.0, "buckets": b})
        records.append({"row_id": f"r{i}", "model": "classical:tfidf-logreg", "judge_score": 0.0 if i < better else 1.0,
                        "buckets": b})
    ref_ = store.put_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    cand = [r for r in records if r["model"] == "candidate"]
    d = decide([1.0] * 60, [0.0 if i < better else 1.0 for i in range(60)], [r["row_id"] for r in cand],
               [r["buckets"] for r in cand], GatePolicy())
    return GateDecided(target=T, passed=d.passed, failed=[Notice(reason_code=c, message="-") for c in d.reason_codes],
                       candidate="candidate", baseline="classical:tfidf-logreg", baseline_kind="classical",
                       records=ref_, test_set_sha256="c" * 64, judge_id="rubric:x",
                       evidence={**d.as_evidence(), "policy": GatePolicy().as_dict()})


async def test_replaying_the_gate_reports_flips_and_records_that_it_was_asked(
        js, nats_server, database, tmp_path, monkeypatch, capsys):
    store = ArtifactStore(tmp_path / "artifacts")
    envs = [envelope(_records_and_gate(store, "run-1", better=12), run_id="run-1", producer="evaluator"),  # delta 0.2
            envelope(_records_and_gate(store, "run-2", better=40), run_id="run-2", producer="evaluator")]  # delta 0.67
    conn = await connect_as_app(database)
    try:
        await conn.copy_records_to_table("run_events", records=_rows(envs, 1), columns=_COLUMNS)
    finally:
        await conn.close()
    policy = tmp_path / "strict.yaml"
    policy.write_text("min_delta: 0.25\n")
    main = _cli_env(monkeypatch, database, nats_server.url)
    args = argparse.Namespace(policy=str(policy), target=T, actor="erin", json=False)
    assert await asyncio.to_thread(replay_cmds.cmd_replay_gate, main, args) == 0
    out = capsys.readouterr().out
    assert "FLIPS run-1" in out and "same  run-2" in out and "1 decision(s) flip" in out
    msg = await js.get_last_msg(subjects.STREAM, subjects.subject_for("gate.replayed", kind="event"))
    event = json.loads(msg.data)
    assert event["type"] == "gate.replayed" and event["producer"] == "cli"
    p = event["payload"]
    assert (p["requested_by"], p["target"], p["decisions"], p["replayed"]) == ("erin", T, 2, 2)
    assert [f["run_id"] for f in p["flipped"]] == ["run-1"] and p["policy"]["min_delta"] == 0.25
    # the replay is read-only: run_events holds what it held, the bus only the audit event
    conn = await connect_as_app(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM run_events") == 2
    finally:
        await conn.close()
    args = argparse.Namespace(policy=str(policy), target="other-target", actor="erin", json=False)
    assert await asyncio.to_thread(replay_cmds.cmd_replay_gate, main, args) == 2
    assert "[audit.history_target_not_found]" in capsys.readouterr().err


async def test_export_reads_the_dataset_version_and_manifest_back_from_the_training_it_evaluated(js, tmp_path):
    from services.common.bus import publish
    from services.export.evidence import find_lineage

    store = ArtifactStore(tmp_path / "artifacts")
    manifest = store.put_bytes(orjson.dumps({"dataset_version": "0123456789abcdef", "label_space": ["a", "b"]}))
    gone = ref("a manifest that is not in this store")
    mine, other = (envelope(TrainingCompleted(plan=plan(), base_model="/m", adapter=ref("a"), manifest=m, eval=ref("e"),
                                              label_space=["a", "b"], steps=3, final_loss=0.1, examples_per_s=1.0,
                                              wall_s=1.0), run_id=r, producer="trainer")
                   for m, r in ((manifest, "run-1"), (gone, "run-2")))
    for env in (mine, other):
        await publish(js, env, subjects.subject_for(env.type, kind="event"))
    last = (await js.stream_info(subjects.STREAM)).state.last_seq
    assert await find_lineage(js, store, mine.event_id, last) == ("0123456789abcdef", manifest)
    assert await find_lineage(js, store, other.event_id, last) == (None, gone)  # recorded as far as known
    assert await find_lineage(js, store, uuid.uuid4(), last) == (None, None)
    assert await find_lineage(js, store, None, last) == (None, None)


async def test_a_version_registered_twice_across_batches_does_not_stop_the_projection(
        js, nats_server, database, tmp_path):
    # the registry never numbers two runs alike, but anyone on the bus may: History follows the registry's
    # fold (the later registration is the version) instead of stopping on its unique index
    from services.common.bus import publish

    envs = _run("dup-1", 1, "d1", 160) + _run("dup-2", 1, "d2", 200)
    for env in envs:
        await publish(js, env, _publish_subject(env))
    svc = await start_audit(nats_server, database, tmp_path, projector_batch=7)  # the two runs in other batches
    conn = await connect_as_app(database)
    try:
        last = lambda: conn.fetchval("SELECT max(global_position) FROM run_events")  # noqa: E731
        await wait_for(lambda: _at_last(conn, last))
        rows = {r["run_id"]: r for r in await conn.fetch("SELECT run_id, version FROM history_runs")}
        assert rows["dup-2"]["version"] == 1 and rows["dup-1"]["version"] is None
        live = await history.snapshot(conn)
        await history.rebuild(conn, batch_size=1)
        assert await history.snapshot(conn) == live
    finally:
        await conn.close()
        await stop_audit(svc)


async def _at_last(conn, last):
    position = await last()
    return position is not None and await _at(conn, position)
