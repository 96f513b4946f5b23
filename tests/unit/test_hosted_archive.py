"""The hosted job archive and the import of past jobs, driven through the real `openai` SDK against the stateful
fake of the documented fine-tuning and files API (tests/unit/test_hosted_openai.py): several pages of jobs,
files the provider deleted (404), a 429 with retry-after, a connection dropped mid-listing, and an import run
twice. Publishing goes to an in-memory log keyed by event id, as run_events is (UNIQUE event_id)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest

from contracts.common import HostedSettings
from contracts.envelope import Envelope
from contracts.registry import decode, encode
from services.cli.import_cmds import envelope
from services.common.artifacts import ArtifactStore
from services.trainer.hosted.archive import (
    ImportedJob,
    JobSnapshots,
    ProviderEventBatcher,
    imported_run_id,
    import_jobs,
)
from services.trainer.hosted.base import HostedEvent
from services.trainer.hosted.cutoffs import cutoffs_for
from services.trainer.preflight import hosted_checks
from tests.unit.test_hosted_openai import KEY, FakeProvider, _error, backend_for

TRAIN = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' * 12
VALID = b'{"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}\n'
HOST = "api.openai.com"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


class AuditLog:
    """What run_events keeps: one row per event id (a re-append of an id is not a new row)."""

    def __init__(self) -> None:
        self.rows: dict = {}
        self.published = 0

    async def publish(self, job: ImportedJob) -> None:
        for payload, step in job.events:
            env = envelope(job.run_id, payload, step)
            decode(encode(env))  # every event is a valid registered contract
            self.published += 1
            self.rows.setdefault(env.event_id, env)

    def imported_runs(self) -> set[str]:
        return {e.run_id for e in self.rows.values() if e.type == "training.provider_archived"}

    def of(self, run_id: str, type_name: str) -> list[Envelope]:
        return [e for e in self.rows.values() if e.run_id == run_id and e.type == type_name]


def history(n: int = 7, **kw) -> tuple[FakeProvider, list[str]]:
    fake = FakeProvider(total_steps=3, **kw)
    jobs = [fake.finished_job(TRAIN, validation=VALID if i % 2 else None, outcome="failed" if i == 4 else "succeeded")
            for i in range(n)]
    return fake, jobs


def run(coro):
    return asyncio.run(coro)


def do_import(fake, store, log: AuditLog, already=None, **kw):
    backend = backend_for(fake, list_page_size=3, sleep=lambda s: None, **kw)
    return run(import_jobs(backend, store, host=HOST, publish=log.publish,
                           already_imported=log.imported_runs() if already is None else already))


def test_batches_are_cut_by_event_count_not_by_polls():
    events = [HostedEvent(id=f"ev-{i}", created_at=i, level="info", message=f"m{i}") for i in range(7)]

    def cut(polls: list[list[HostedEvent]]) -> list[tuple[str, list[str]]]:
        b, out = ProviderEventBatcher("openai", "ftjob-1", size=3), []
        for poll in polls:
            out += [x for x in map(b.add, poll) if x is not None]
        out.append(b.flush())
        return [(ProviderEventBatcher.step(x), [e.id for e in x.events]) for x in out]

    one_poll = cut([events])
    many_polls = cut([events[:1], events[1:5], [], events[5:]])  # a redelivery polls at other moments
    assert one_poll == many_polls
    assert [ids for _, ids in one_poll] == [["ev-0", "ev-1", "ev-2"], ["ev-3", "ev-4", "ev-5"], ["ev-6"]]


def test_a_job_snapshot_is_named_by_its_content_not_its_estimated_finish():
    snaps = JobSnapshots("openai", "ftjob-1")
    first = snaps.observe({"id": "ftjob-1", "status": "running", "estimated_finish": 10, "trained_tokens": None})
    assert snaps.observe({"id": "ftjob-1", "status": "running", "estimated_finish": 20}) is None  # no status change
    again = JobSnapshots("openai", "ftjob-1").observe({"id": "ftjob-1", "status": "running", "estimated_finish": 99,
                                                       "trained_tokens": None})
    assert JobSnapshots.step(first) == JobSnapshots.step(again)


def test_import_pages_through_every_job_and_keeps_its_whole_history(tmp_path):
    fake, jobs = history(7)
    store, log = ArtifactStore(tmp_path / "a"), AuditLog()
    report = do_import(fake, store, log)

    assert report.found == 7 and sorted(report.imported) == sorted(jobs) and not report.failed
    listing = [q for m, p, q in fake.params if m == "GET" and p == "/fine_tuning/jobs"]
    assert len(listing) == 3 and [q.get("after") for q in listing][0] is None  # 3 pages of 3, 3, 1
    for job_id in jobs:
        run_id = imported_run_id(HOST, job_id)
        (archived,) = [e.payload for e in log.of(run_id, "training.provider_archived")]
        provider_events = [ev["id"] for b in log.of(run_id, "training.provider_event") for ev in b.payload["events"]]
        assert provider_events == [e["id"] for e in fake.events[job_id]]  # every event, once, oldest first
        assert archived["events_archived"] == len(provider_events)
        (snapshot,) = log.of(run_id, "training.provider_job")
        assert snapshot.payload["job"]["hyperparameters"]["n_epochs"] == 3
        files = {f["role"]: f for f in archived["files"]}
        assert files["training"]["artifact"]["sha256"] == hashlib.sha256(TRAIN).hexdigest()
        if archived["status"] == "succeeded":
            assert [c["step"] for c in archived["checkpoints"]] == [1, 2, 3]
            assert archived["checkpoints"][0]["metrics"]["full_valid_loss"] == 2.3
            result = files["result"]
            assert store.read_bytes(store_ref(result)) == fake.contents[fake.jobs[job_id]["result_files"][0]]
        else:
            assert archived["status"] == "failed" and "result" not in files
            assert snapshot.payload["job"]["error"]["code"] == "invalid_n_examples"


def store_ref(f):
    from contracts.common import ArtifactRef

    return ArtifactRef.model_validate(f["artifact"])


def test_running_the_import_again_imports_nothing_new(tmp_path):
    fake, jobs = history(5)
    store, log = ArtifactStore(tmp_path / "a"), AuditLog()
    first = do_import(fake, store, log)
    rows = dict(log.rows)
    again = do_import(fake, store, log)
    assert (len(first.imported), len(again.imported), len(again.skipped)) == (5, 0, 5)
    assert log.rows == rows
    # The recorder had not caught up (nothing looks imported yet): the same ids are published again, no new row.
    lagging = do_import(fake, store, log, already=set())
    assert len(lagging.imported) == 5 and log.rows.keys() == rows.keys()


def test_a_job_whose_files_were_deleted_is_archived_with_what_is_left(tmp_path):
    fake, (old, new) = history(2)
    fake.delete_file(fake.jobs[old]["training_file"])
    fake.delete_file(fake.jobs[old]["result_files"][0])
    log = AuditLog()
    report = do_import(fake, ArtifactStore(tmp_path / "a"), log)
    assert sorted(report.imported) == sorted([old, new]) and len(report.files_unavailable) == 2
    (archived,) = log.of(imported_run_id(HOST, old), "training.provider_archived")
    files = {f["role"]: f for f in archived.payload["files"]}
    for role in ("training", "result"):
        assert files[role]["artifact"] is None
        assert files[role]["unavailable"]["reason_code"] == "training.provider_file_unavailable"
        assert "deleted or expired" in files[role]["unavailable"]["message"]
    assert archived.payload["fine_tuned_model"] and len(archived.payload["checkpoints"]) == 3  # the rest is kept


def test_rate_limit_with_retry_after_during_the_listing_is_waited_out(tmp_path):
    fake, jobs = history(5)
    fake.fail("GET", r"/fine_tuning/jobs", _error(429, "Rate limit reached for requests", type_="requests",
                                                  code="rate_limit_exceeded", headers={"retry-after": "0"}),
              query={"after": jobs[2]})  # the second page
    report = do_import(fake, ArtifactStore(tmp_path / "a"), AuditLog())
    assert fake.faults[0]["times"] == 0 and sorted(report.imported) == sorted(jobs)
    second = [1 for m, p, q in fake.params if p == "/fine_tuning/jobs" and q.get("after") == jobs[2]]
    assert len(second) == 2  # the 429, then the same page again


def test_a_connection_dropped_mid_listing_resumes_from_the_cursor_without_duplicates(tmp_path):
    fake, jobs = history(7)
    # Page 2 fails 4 times in a row: more than the SDK's own retries (1 here), so the listing resumes itself.
    fake.fail("GET", r"/fine_tuning/jobs", exc=httpx.ConnectError, times=4, query={"after": jobs[4]})
    log = AuditLog()
    report = do_import(fake, ArtifactStore(tmp_path / "a"), log, max_retries=1)
    assert report.found == 7 and sorted(report.imported) == sorted(jobs) and not report.failed
    listing = [q.get("after") for m, p, q in fake.params if p == "/fine_tuning/jobs"]
    assert listing.count(None) == 1  # page 1 was not listed again
    assert listing.count(jobs[4]) == 5  # 4 drops, then the page
    assert len(log.imported_runs()) == 7


def test_a_job_the_provider_keeps_refusing_fails_with_its_reason_and_is_left_for_the_next_run(tmp_path):
    fake, (old, new) = history(2)
    fake.fail("GET", rf"/fine_tuning/jobs/{old}/events", _error(500, "The server had an error"), times=20)
    log = AuditLog()
    report = do_import(fake, ArtifactStore(tmp_path / "a"), log, max_retries=0, resume_attempts=1)
    assert report.imported == [new] and [(j, c) for j, c, _ in report.failed] == [(old, "training.runtime_error")]
    assert "HTTP 500" in report.failed[0][2]
    assert log.imported_runs() == {imported_run_id(HOST, new)}  # nothing of the failed job counts as imported
    fake.faults.clear()
    later = do_import(fake, ArtifactStore(tmp_path / "a"), log)
    assert later.imported == [old] and later.skipped == [new]


def test_since_stops_the_listing_at_older_jobs(tmp_path):
    fake, jobs = history(5)
    cut = fake.jobs[jobs[2]]["created_at"]
    backend = backend_for(fake, list_page_size=2)
    report = run(import_jobs(backend, ArtifactStore(tmp_path / "a"), host=HOST, publish=AuditLog().publish,
                             already_imported=set(), since=cut))
    assert sorted(report.imported) == sorted(jobs[2:])


def test_the_api_key_reaches_no_event_log_line_or_artifact(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    fake, jobs = history(2)
    # A provider that quotes the key back in what it stores (a careless error message, an event).
    fake.event(jobs[0], f"debug: request authorised with {KEY}")
    fake.jobs[jobs[1]]["error"] = {"code": "x", "message": f"key {KEY} rejected", "param": None}
    store, log = ArtifactStore(tmp_path / "a"), AuditLog()
    do_import(fake, store, log)
    dumped = "".join(encode(e).decode() for e in log.rows.values())
    assert "request authorised with ***" in dumped and KEY not in dumped
    out = capsys.readouterr()
    assert KEY not in caplog.text + out.out + out.err
    for f in (tmp_path / "a").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes()


def test_preflight_warns_of_an_announced_cutoff_naming_the_date():
    checks = hosted_checks(HostedSettings(model="gpt-4o-mini-2024-07-18"), {"OPENAI_API_KEY": "x"})
    (warn,) = [c for c in checks if c.status == "warn"]
    assert warn.reason_code == "preflight.hosted_cutoff" and "2027-01-06" in warn.message
    assert "source:" in warn.message and "--backend local" in warn.message
    nano = hosted_checks(HostedSettings(model="gpt-4.1-nano-2025-04-14"), {"OPENAI_API_KEY": "x"})
    assert any("2026-10-23" in c.message for c in nano if c.status == "warn")
    other = hosted_checks(HostedSettings(base_url="https://api.together.example/v1"), {"OPENAI_API_KEY": "x"})
    assert not [c for c in other if c.status == "warn"] and cutoffs_for("https://api.together.example/v1", "m") == []


def test_recipes_name_the_closing_hosted_paths(capsys):
    from services.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["recipes"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "2027-01-06" in out and "api.openai.com" in out and "--backend local" in out
    with pytest.raises(SystemExit):
        main(["recipes", "--json"])
    json.loads(capsys.readouterr().out)  # --json stays machine-readable
