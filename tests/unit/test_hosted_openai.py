"""OpenAIHostedBackend driven through the real `openai` SDK against a stateful fake of the documented API.

The fake (an httpx.MockTransport handler) implements the fine-tuning and files endpoints as the OpenAI
API reference documents them: `fine_tuning.job`, `fine_tuning.job.event` (listed newest first, `after`
pages to older ones), `fine_tuning.job.checkpoint` and `file` objects, list envelopes with
`object: "list"`, `data` and `has_more`, and `{"error": {...}}` bodies for HTTP errors.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.trainer.hosted.base import HostedJobSpec, HostedTrainingError
from services.trainer.hosted.openai_backend import METADATA_KEY, OpenAIHostedBackend, progress_from_metrics, suffix_for

KEY = "sk-tuneline-FAKE-KEY-do-not-leak-7f3a9c"
WRONG_KEY = "sk-tuneline-WRONG-KEY-must-not-leak-51d2e8"
FAST = 0.001  # poll interval


def _error(status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type_, "param": param, "code": code}},
                          headers=headers)


class FakeProvider:
    """A small stateful fine-tuning provider. Each GET of a job advances it one step of its script."""

    def __init__(self, *, host: str = "api.openai.com", base_path: str = "/v1", api_key: str = KEY,
                 outcome: str = "succeeded", total_steps: int = 3, supports_metadata: bool = True,
                 echo_suffix: bool = False) -> None:
        self.host, self.base_path, self.api_key = host, base_path, api_key
        self.outcome, self.total_steps = outcome, total_steps
        self.supports_metadata, self.echo_suffix = supports_metadata, echo_suffix
        self.files: dict[str, dict] = {}
        self.contents: dict[str, bytes] = {}  # file id -> what GET /files/{id}/content serves
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}  # oldest first
        self.checkpoints: dict[str, list[dict]] = {}
        self.steps: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.params: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query) of every request
        self.hosts: set[str] = set()
        self.bodies: list[dict] = []
        self.uploads: list[dict] = []
        self.faults: list[dict] = []
        self._ids = itertools.count(1)
        self._clock = itertools.count(1_721_764_800)

    # --- test controls ------------------------------------------------------------------------

    def fail(self, method: str, path: str, response=None, *, exc: type[Exception] | None = None,
             times: int = 1, after: bool = False, query: dict[str, str] | None = None) -> None:
        """Make the next `times` matching requests fail: with `response`, or by raising `exc` (before the
        request is handled, or `after` it was handled: a response lost on the way back). `query`: only
        requests carrying these query parameters match (e.g. one page of a listing)."""
        self.faults.append({"method": method, "path": re.compile(path), "response": response, "exc": exc,
                            "times": times, "after": after, "query": query or {}})

    def delete_file(self, file_id: str) -> None:
        """The provider deleted the file (or it expired): GET /files/{id} and its content answer 404."""
        self.files.pop(file_id)
        self.contents.pop(file_id)

    def add_file(self, content: bytes, filename: str, purpose: str = "fine-tune") -> str:
        f = {"object": "file", "id": f"file-{next(self._ids)}", "bytes": len(content), "created_at": next(self._clock),
             "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
             "status_details": None}
        self.files[f["id"]] = f
        self.contents[f["id"]] = content
        return f["id"]

    def finished_job(self, training: bytes, *, validation: bytes | None = None, model: str = "gpt-4o-mini-2024-07-18",
                     outcome: str = "succeeded", suffix: str = "past") -> str:
        """A job trained some time ago (outside Tuneline), run to its end."""
        body = {"model": model, "training_file": self.add_file(training, "train.jsonl"), "suffix": suffix}
        if validation is not None:
            body["validation_file"] = self.add_file(validation, "valid.jsonl")
        job_id = self.create_job(body).json()["id"]
        saved, self.outcome = self.outcome, outcome
        try:
            while self.jobs[job_id]["status"] not in ("succeeded", "failed", "cancelled"):
                self.advance(job_id)
        finally:
            self.outcome = saved
        return job_id

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.fullmatch(path, p))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # --- HTTP ---------------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.hosts.add(request.url.host)
        path = request.url.path
        assert path.startswith(self.base_path + "/"), path
        path = path[len(self.base_path):]
        self.requests.append((request.method, path))
        self.params.append((request.method, path, dict(request.url.params)))
        if request.url.host != self.host:
            return _error(404, f"unknown host {request.url.host}")
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            # Echo the presented key, as careless providers do: the backend must not repeat it.
            presented = auth.removeprefix("Bearer ")
            return _error(401, f"Incorrect API key provided: {presented}.", code="invalid_api_key")
        fault = next((f for f in self.faults if f["times"] > 0 and f["method"] == request.method
                      and f["path"].fullmatch(path)
                      and all(request.url.params.get(k) == v for k, v in f.get("query", {}).items())), None)
        if fault is not None:
            fault["times"] -= 1
            if fault["exc"] is not None and not fault["after"]:
                raise fault["exc"]("connection dropped by fake provider", request=request)
            if fault["response"] is not None:
                return fault["response"]
        response = self.route(request, path)
        if fault is not None and fault["after"]:
            raise fault["exc"]("response lost: connection dropped by fake provider", request=request)
        return response

    def route(self, request: httpx.Request, path: str) -> httpx.Response:
        m, q = request.method, request.url.params
        if m == "POST" and path == "/files":
            return self.create_file(request)
        if m == "GET" and path == "/files":
            files = [f for f in reversed(self.files.values()) if q.get("purpose") in (None, f["purpose"])]
            return self.page(files, q, default_limit=10000)
        if m == "POST" and path == "/fine_tuning/jobs":
            return self.create_job(json.loads(request.content))
        if m == "GET" and path == "/fine_tuning/jobs":
            jobs = [self.public(j) for j in reversed(self.jobs.values())]
            if self.supports_metadata:
                for k, v in q.multi_items():
                    mk = re.fullmatch(r"metadata\[(.+)\]", k)
                    if mk:
                        jobs = [j for j in jobs if (j.get("metadata") or {}).get(mk.group(1)) == v]
            return self.page(jobs, q)
        mf = re.fullmatch(r"/files/([^/]+)(/content)?", path)
        if m == "GET" and mf is not None:
            file_id, content = mf.groups()
            if file_id not in self.files:
                return _error(404, f"No such File object: {file_id}", param="id")
            if content:
                return httpx.Response(200, content=self.contents[file_id],
                                      headers={"content-type": "application/octet-stream"})
            return httpx.Response(200, json=self.files[file_id])
        mj = re.fullmatch(r"/fine_tuning/jobs/([^/]+)(?:/(events|checkpoints|cancel|pause|resume))?", path)
        if mj is None or mj.group(1) not in self.jobs:
            return _error(404, f"No such path or job: {path}", code="not_found")
        job_id, sub = mj.groups()
        job = self.jobs[job_id]
        if m == "GET" and sub is None:
            self.advance(job_id)
            return httpx.Response(200, json=self.public(job))
        if m == "GET" and sub == "events":
            return self.page(list(reversed(self.events[job_id])), q)
        if m == "GET" and sub == "checkpoints":
            return self.page(list(reversed(self.checkpoints[job_id])), q, default_limit=10)
        if m == "POST" and sub == "cancel":
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return _error(400, f"Job {job_id} has already completed: {job['status']}", code="invalid_job_state")
            job["status"] = "cancelled"
            job["finished_at"] = next(self._clock)
            self.event(job_id, "Fine-tuning job cancelled")
            return httpx.Response(200, json=self.public(job))
        if m == "POST" and sub == "pause":
            if job["status"] != "running":
                return _error(400, f"Job {job_id} cannot be paused in status {job['status']}")
            job["status"] = "paused"
            self.event(job_id, "Fine-tuning job paused")
            return httpx.Response(200, json=self.public(job))
        if m == "POST" and sub == "resume":
            if job["status"] != "paused":
                return _error(400, f"Job {job_id} is not paused")
            job["status"] = "running"
            self.event(job_id, "Fine-tuning job resumed")
            return httpx.Response(200, json=self.public(job))
        return _error(405, f"{m} not allowed on {path}")

    def page(self, items: list[dict], q, *, default_limit: int = 20) -> httpx.Response:
        after = q.get("after")
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        limit = int(q.get("limit", default_limit))
        return httpx.Response(200, json={"object": "list", "data": items[:limit], "has_more": len(items) > limit})

    def create_file(self, request: httpx.Request) -> httpx.Response:
        raw = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.content
        msg = email.message_from_bytes(raw, policy=email.policy.HTTP)
        parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
        content = parts["file"].get_payload(decode=True)
        purpose = parts["purpose"].get_payload(decode=True).decode()
        assert purpose == "fine-tune"
        f = {"object": "file", "id": f"file-{next(self._ids)}", "bytes": len(content), "created_at": next(self._clock),
             "filename": parts["file"].get_filename(), "purpose": purpose, "status": "processed",
             "expires_at": None, "status_details": None}
        self.files[f["id"]] = f
        self.contents[f["id"]] = content
        self.uploads.append({"filename": f["filename"], "content": content})
        return httpx.Response(200, json=f)

    def create_job(self, body: dict) -> httpx.Response:
        self.bodies.append(body)
        if "metadata" in body and not self.supports_metadata:
            return _error(400, "Unrecognized request argument supplied: metadata", param="metadata")
        for field in ("training_file", "validation_file"):
            fid = body.get(field)
            if fid is not None and (fid not in self.files or self.files[fid]["purpose"] != "fine-tune"):
                return _error(400, f"invalid {field}: {fid}", param=field)
        hyper = ((body.get("method") or {}).get("supervised") or {}).get("hyperparameters") or {}
        resolved = {"n_epochs": hyper.get("n_epochs", 3), "batch_size": hyper.get("batch_size", 1),
                    "learning_rate_multiplier": hyper.get("learning_rate_multiplier", 1.8)}
        job_id = f"ftjob-{next(self._ids):04d}"
        job = {
            "object": "fine_tuning.job", "id": job_id, "model": body["model"], "created_at": next(self._clock),
            "finished_at": None, "fine_tuned_model": None, "organization_id": "org-tuneline", "result_files": [],
            "status": "validating_files", "validation_file": body.get("validation_file"),
            "training_file": body["training_file"], "hyperparameters": resolved, "trained_tokens": None,
            "error": None, "integrations": [], "seed": body.get("seed", 1234), "estimated_finish": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": resolved}},
            "metadata": body.get("metadata") if self.supports_metadata else None,
            "_suffix": body.get("suffix"),
        }
        self.jobs[job_id] = job
        self.events[job_id] = []
        self.checkpoints[job_id] = []
        self.steps[job_id] = 0
        self.event(job_id, f"Created fine-tuning job: {job_id}")
        self.event(job_id, "Validating training file: " + body["training_file"])
        return httpx.Response(200, json=self.public(job))

    def public(self, job: dict) -> dict:
        out = {k: v for k, v in job.items() if not k.startswith("_")}
        if self.echo_suffix:
            out["suffix"] = job["_suffix"]
        return out

    def event(self, job_id: str, message: str, *, type_: str = "message", data: dict | None = None,
              level: str = "info") -> None:
        self.events[job_id].append({"object": "fine_tuning.job.event", "id": f"ftevent-{next(self._ids)}",
                                    "created_at": next(self._clock), "level": level, "message": message,
                                    "data": data if data is not None else {}, "type": type_})

    def advance(self, job_id: str) -> None:
        job = self.jobs[job_id]
        status = job["status"]
        if status == "validating_files":
            if self.outcome == "failed":
                job.update(status="failed", finished_at=next(self._clock),
                           error={"code": "invalid_n_examples", "param": "training_file",
                                  "message": "Training file has 3 example(s), but must have at least 10 examples"})
                self.event(job_id, "Training file has 3 example(s), but must have at least 10 examples",
                           level="error")
                return
            job["status"] = "queued"
            self.event(job_id, "Files validated, moving job to queued state")
        elif status == "queued":
            job["status"] = "running"
            self.event(job_id, "Fine-tuning job started")
        elif status == "running":
            step = self.steps[job_id]
            if step < self.total_steps:
                step = self.steps[job_id] = step + 1
                loss = round(2.0 / step, 4)
                self.event(job_id, f"Step {step}/{self.total_steps}: training loss={loss}", type_="metrics",
                           data={"step": step, "train_loss": loss, "train_mean_token_accuracy": 0.5 + step / 10,
                                 "total_steps": self.total_steps})
                return
            if self.outcome == "hang":
                return
            model = f"ft:{job['model']}:org-tuneline:{job['_suffix']}:AbC123xy"
            for s in range(1, self.total_steps + 1):
                name = model if s == self.total_steps else f"{model}:ckpt-step-{s}"
                self.checkpoints[job_id].append({
                    "object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id}-{s}",
                    "created_at": next(self._clock),
                    "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job_id, "step_number": s,
                    "metrics": {"step": s, "train_loss": round(2.0 / s, 4), "train_mean_token_accuracy": 0.5 + s / 10,
                                "valid_loss": round(2.2 / s, 4), "valid_mean_token_accuracy": 0.4 + s / 10,
                                "full_valid_loss": round(2.3 / s, 4), "full_valid_mean_token_accuracy": 0.4 + s / 10}})
            csv = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n" + "".join(
                f"{s},{round(2.0 / s, 4)},{0.5 + s / 10},{round(2.2 / s, 4)},{0.4 + s / 10}\n"
                for s in range(1, self.total_steps + 1))
            result = {"object": "file", "id": f"file-{next(self._ids)}", "bytes": len(csv), "created_at": next(self._clock),
                      "filename": "step_metrics.csv", "purpose": "fine-tune-results", "status": "processed"}
            self.files[result["id"]] = result
            self.contents[result["id"]] = csv.encode()
            job.update(status="succeeded", fine_tuned_model=model, trained_tokens=5768,
                       finished_at=next(self._clock), result_files=[result["id"]])
            self.event(job_id, f"Checkpoint created at step {self.total_steps}")
            self.event(job_id, f"New fine-tuned model created: {model}")
            self.event(job_id, "Evaluating model against our usage policies")
            self.event(job_id, "The job has successfully completed")
        # paused / terminal: nothing moves


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def splits(tmp_path: Path) -> tuple[Path, Path]:
    row = {"messages": [{"role": "user", "content": "great film"}, {"role": "assistant", "content": "positive"}]}
    train, valid = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(row) for _ in range(12)) + "\n")
    valid.write_text(json.dumps(row) + "\n")
    return train, valid


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def spec_for(splits, key: str = "run-1/trainer", **kw: Any) -> HostedJobSpec:
    train, valid = splits
    defaults = dict(base_model="gpt-4o-mini-2024-07-18", training_file=train, validation_file=valid, n_epochs=3,
                    batch_size=4, learning_rate_multiplier=0.5, suffix="sentiment", seed=7, idempotency_key=key)
    defaults.update(kw)
    return HostedJobSpec(**defaults)


def backend_for(fake: FakeProvider, **kw: Any) -> OpenAIHostedBackend:
    kw.setdefault("max_retries", 2)
    base_url = kw.pop("base_url", f"https://{fake.host}{fake.base_path}")
    return OpenAIHostedBackend(base_url=base_url, http_client=httpx.Client(transport=fake.transport()), **kw)


# --- scenarios ------------------------------------------------------------------------------


def test_success_reports_progress_events_once_and_outcome(splits):
    fake = FakeProvider(total_steps=3)
    backend = backend_for(fake, event_page_size=2)  # small pages: the final burst of events spans pages
    spec = spec_for(splits)
    job_id = backend.submit(spec)

    progress, events, polls = [], [], []
    outcome = backend.follow(job_id, on_progress=progress.append, on_event=events.append, poll_interval=FAST,
                             timeout=10, on_poll=polls.append)

    assert outcome.status == "succeeded" and outcome.reason_code is None
    assert outcome.fine_tuned_model == f"ft:gpt-4o-mini-2024-07-18:org-tuneline:{suffix_for(spec)}:AbC123xy"
    assert outcome.trained_tokens == 5768
    assert len(outcome.result_files) == 1
    assert [c.step for c in outcome.checkpoints] == [1, 2, 3]
    assert outcome.checkpoints[-1].model == outcome.fine_tuned_model
    assert outcome.checkpoints[0].valid_loss == 2.2
    assert outcome.raise_for_status() is outcome

    assert [p.step for p in progress] == [1, 2, 3]
    assert [p.total_steps for p in progress] == [3, 3, 3]
    assert [p.train_loss for p in progress] == [2.0, 1.0, 0.6667]
    assert [p.epoch for p in progress] == [1.0, 2.0, 3.0]  # step / total_steps * n_epochs (3)

    # Every provider event exactly once, oldest first, although the events were listed on every poll.
    assert [e.id for e in events] == [e["id"] for e in fake.events[job_id]]
    assert len({e.id for e in events}) == len(events)
    assert events[-1].message == "The job has successfully completed"
    assert [e.type for e in events].count("metrics") == 3
    assert fake.count("GET", rf"/fine_tuning/jobs/{job_id}/events") > len(polls)  # paging happened
    assert polls[-1] == "succeeded" and "running" in polls

    # The create request carries what the API reference documents.
    (body,) = fake.bodies
    assert body["model"] == "gpt-4o-mini-2024-07-18"
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}}}
    assert body["suffix"] == suffix_for(spec) and body["suffix"].startswith("sentiment-tl-")
    assert len(body["suffix"]) <= 64
    assert body["seed"] == 7
    assert body["metadata"] == {METADATA_KEY: "run-1/trainer"}
    assert fake.files[body["training_file"]]["purpose"] == "fine-tune"
    assert fake.files[body["validation_file"]]["filename"].endswith("-eval.jsonl")
    assert [u["content"] for u in fake.uploads] == [splits[0].read_bytes(), splits[1].read_bytes()]


def test_failed_job_becomes_runtime_error_with_provider_message(splits):
    fake = FakeProvider(outcome="failed")
    backend = backend_for(fake)
    job_id = backend.submit(spec_for(splits))
    events = []
    outcome = backend.follow(job_id, on_event=events.append, poll_interval=FAST, timeout=10)

    assert outcome.status == "failed"
    assert outcome.error_code == "invalid_n_examples"
    assert "at least 10 examples" in outcome.error_message
    assert outcome.reason_code == "training.runtime_error"
    assert outcome.fine_tuned_model is None and outcome.checkpoints == ()
    assert events[-1].level == "error"
    with pytest.raises(HostedTrainingError) as err:
        outcome.raise_for_status()
    assert err.value.reason_code == "training.runtime_error"
    assert "invalid_n_examples" in err.value.message and "at least 10 examples" in err.value.message


def test_cancelled_job_ends_as_cancelled(splits):
    fake = FakeProvider(total_steps=5, outcome="hang")
    backend = backend_for(fake)
    job_id = backend.submit(spec_for(splits))
    statuses = []

    def cancel_after_first_step(p):
        if p.step == 1:
            statuses.append(backend.cancel(job_id))

    progress = []
    outcome = backend.follow(job_id, on_progress=lambda p: (progress.append(p), cancel_after_first_step(p)),
                             poll_interval=FAST, timeout=10)
    assert statuses == ["cancelled"]
    assert outcome.status == "cancelled" and outcome.reason_code == "training.cancelled"
    assert [p.step for p in progress] == [1]
    assert fake.count("POST", rf"/fine_tuning/jobs/{job_id}/cancel") == 1
    with pytest.raises(HostedTrainingError) as err:
        outcome.raise_for_status()
    assert err.value.reason_code == "training.cancelled"

    # Cancelling a finished job is the provider's 400, surfaced with its message, not retried.
    with pytest.raises(HostedTrainingError) as err:
        backend.cancel(job_id)
    assert err.value.reason_code == "training.runtime_error" and not err.value.retryable
    assert "already completed" in err.value.message
    assert fake.count("POST", rf"/fine_tuning/jobs/{job_id}/cancel") == 2


def test_pause_then_resume(splits):
    fake = FakeProvider(total_steps=3)
    backend = backend_for(fake)
    job_id = backend.submit(spec_for(splits))
    progress = []

    def pause_at_step_1(p):
        progress.append(p)
        if p.step == 1:
            assert backend.pause(job_id) == "paused"

    # While paused nothing advances; following it times out (the job is left paused, not cancelled).
    first_events = []
    with pytest.raises(HostedTrainingError) as err:
        backend.follow(job_id, on_progress=pause_at_step_1, on_event=first_events.append, poll_interval=FAST,
                       timeout=0.2)
    assert err.value.reason_code == "training.timeout"
    assert "still paused" in err.value.message
    assert [p.step for p in progress] == [1]
    assert fake.jobs[job_id]["status"] == "paused"

    assert backend.resume(job_id) == "running"
    progress.clear()
    later_events = []
    # Following again (as after a crash) from the last delivered event delivers only what came after it.
    outcome = backend.follow(job_id, on_progress=progress.append, on_event=later_events.append, poll_interval=FAST,
                             timeout=10, since_event_id=first_events[-1].id)
    assert outcome.status == "succeeded"
    assert [p.step for p in progress] == [2, 3]
    delivered = [e.id for e in first_events + later_events]
    assert delivered == [e["id"] for e in fake.events[job_id]]
    messages = [e["message"] for e in fake.events[job_id]]
    assert messages.index("Fine-tuning job paused") < messages.index("Fine-tuning job resumed")


def test_rate_limit_with_retry_after_is_retried_by_the_sdk(splits):
    fake = FakeProvider(total_steps=1)
    backend = backend_for(fake)
    job_id = backend.submit(spec_for(splits))
    fake.fail("GET", rf"/fine_tuning/jobs/{job_id}",
              _error(429, "Rate limit reached for requests", type_="requests", code="rate_limit_exceeded",
                     headers={"retry-after": "0"}))
    outcome = backend.follow(job_id, poll_interval=FAST, timeout=10)
    assert outcome.status == "succeeded"
    assert fake.faults[0]["times"] == 0  # the 429 was served ...
    first_get = fake.requests.index(("GET", f"/fine_tuning/jobs/{job_id}"))
    assert fake.requests[first_get + 1] == ("GET", f"/fine_tuning/jobs/{job_id}")  # ... and the GET resent


def test_rate_limit_that_persists_is_a_retryable_runtime_error(splits):
    fake = FakeProvider()
    backend = backend_for(fake, max_retries=1)
    job_id = backend.submit(spec_for(splits))
    fake.fail("GET", rf"/fine_tuning/jobs/{job_id}",
              _error(429, "Rate limit reached", code="rate_limit_exceeded", headers={"retry-after": "0"}), times=9)
    with pytest.raises(HostedTrainingError) as err:
        backend.follow(job_id, poll_interval=FAST, timeout=10)
    assert err.value.reason_code == "training.runtime_error" and err.value.retryable
    assert "HTTP 429" in err.value.message and "Rate limit reached" in err.value.message
    assert fake.count("GET", rf"/fine_tuning/jobs/{job_id}") == 2


def test_dropped_connection_is_retried_then_surfaces_as_runtime_error(splits):
    fake = FakeProvider(total_steps=1)
    backend = backend_for(fake, max_retries=1)
    job_id = backend.submit(spec_for(splits))

    # Once: the SDK retries and the caller never notices.
    fake.fail("GET", rf"/fine_tuning/jobs/{job_id}", exc=httpx.ConnectError)
    assert backend.follow(job_id, poll_interval=FAST, timeout=10).status == "succeeded"

    # Persistently: after the SDK's retries it is a retryable runtime error that says what happened.
    fake.fail("GET", rf"/fine_tuning/jobs/{job_id}", exc=httpx.RemoteProtocolError, times=5)
    before = fake.count("GET", rf"/fine_tuning/jobs/{job_id}")
    with pytest.raises(HostedTrainingError) as err:
        backend.follow(job_id, poll_interval=FAST, timeout=10)
    assert fake.count("GET", rf"/fine_tuning/jobs/{job_id}") - before == 2  # first try + 1 retry
    assert err.value.reason_code == "training.runtime_error" and err.value.retryable
    assert "connection failed" in err.value.message and "api.openai.com" in err.value.message
    assert "RemoteProtocolError" in err.value.message
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_lost_create_response_does_not_create_a_second_job(splits):
    fake = FakeProvider()
    backend = backend_for(fake, sleep=lambda s: None)
    # The provider creates the job, then the connection drops before the answer arrives.
    fake.fail("POST", r"/fine_tuning/jobs", exc=httpx.RemoteProtocolError, after=True)
    job_id = backend.submit(spec_for(splits))
    assert fake.count("POST", r"/fine_tuning/jobs") == 1
    assert list(fake.jobs) == [job_id]


def test_timeout_while_running(splits):
    fake = FakeProvider(total_steps=2, outcome="hang")
    backend = backend_for(fake)
    job_id = backend.submit(spec_for(splits))
    progress = []
    started = time.monotonic()
    with pytest.raises(HostedTrainingError) as err:
        backend.follow(job_id, on_progress=progress.append, poll_interval=0.01, timeout=0.15)
    assert time.monotonic() - started < 2
    assert err.value.reason_code == "training.timeout" and not err.value.retryable
    assert "still running" in err.value.message and job_id in err.value.message
    assert [p.step for p in progress] == [1, 2]
    assert fake.jobs[job_id]["status"] == "running"  # not cancelled behind the caller's back


def test_submit_is_idempotent_on_the_key(splits):
    fake = FakeProvider()
    spec = spec_for(splits)
    first = backend_for(fake).submit(spec)
    again = backend_for(fake).submit(spec)  # a redelivery, in a fresh process
    assert again == first
    assert fake.count("POST", r"/fine_tuning/jobs") == 1
    assert fake.count("POST", r"/files") == 2  # train + validation, once each
    # The lookup uses the documented metadata filter.
    assert fake.count("GET", r"/fine_tuning/jobs") == 2

    other = backend_for(fake).submit(spec_for(splits, key="run-2/trainer"))
    assert other != first
    assert fake.count("POST", r"/fine_tuning/jobs") == 2
    assert fake.count("POST", r"/files") == 2  # same content: the uploads are reused


def test_a_failed_create_keeps_its_uploads_for_the_retry(splits):
    fake = FakeProvider()
    fake.fail("POST", r"/fine_tuning/jobs", _error(400, "Model gpt-9 is not available for fine-tuning",
                                                   code="model_not_available", param="model"))
    spec = spec_for(splits)
    with pytest.raises(HostedTrainingError) as err:
        backend_for(fake).submit(spec)
    assert not err.value.retryable and "not available for fine-tuning" in err.value.message
    job_id = backend_for(fake).submit(spec)
    assert job_id in fake.jobs
    assert fake.count("POST", r"/files") == 2


def test_openai_compatible_host_via_base_url(splits, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    fake = FakeProvider(host="api.together.example", base_path="/v1", supports_metadata=False, total_steps=2)
    backend = backend_for(fake, base_url="https://api.together.example/v1", api_key_env="TOGETHER_API_KEY",
                          provider="together", use_metadata=False)
    spec = spec_for(splits, base_model="meta-llama/Meta-Llama-3.1-8B-Instruct-Reference")
    job_id = backend.submit(spec)
    outcome = backend.follow(job_id, poll_interval=FAST, timeout=10)
    assert outcome.status == "succeeded"
    assert fake.hosts == {"api.together.example"}
    assert "metadata" not in fake.bodies[0]
    # Without job metadata the finished job is found again by the suffix tag in its model name.
    assert backend.submit(spec) == job_id
    assert fake.count("POST", r"/fine_tuning/jobs") == 1
    assert "together" in repr(backend) and "api.together.example" in repr(backend)


def test_host_echoing_the_suffix_is_matched_while_running(splits):
    fake = FakeProvider(supports_metadata=False, echo_suffix=True)
    backend = backend_for(fake, use_metadata=False)
    spec = spec_for(splits)
    job_id = backend.submit(spec)
    assert backend.submit(spec) == job_id
    assert fake.count("POST", r"/fine_tuning/jobs") == 1


def test_api_key_never_leaks(splits, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's own debug logs included
    fake = FakeProvider()

    # A wrong key: the fake's 401 body quotes the presented key verbatim.
    monkeypatch.setenv("OPENAI_API_KEY", WRONG_KEY)
    bad = backend_for(fake)
    with pytest.raises(HostedTrainingError) as err:
        bad.submit(spec_for(splits))
    assert fake.count("GET", r"/fine_tuning/jobs") == 1  # 401 is not retried
    e = err.value
    assert e.reason_code == "training.runtime_error" and not e.retryable
    assert "$OPENAI_API_KEY" in e.message and "HTTP 401" in e.message
    assert e.__cause__ is None and e.__context__ is None
    for text in (str(e), repr(e), repr(e.args), e.message, repr(bad), str(bad)):
        assert WRONG_KEY not in text and KEY not in text

    # The right key: a whole run, then every returned object and every log line.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    good = backend_for(fake)
    events, progress = [], []
    outcome = good.follow(good.submit(spec_for(splits)), on_event=events.append, on_progress=progress.append,
                          poll_interval=FAST, timeout=10)
    assert outcome.status == "succeeded"
    for text in (repr(good), str(good), repr(outcome), repr(events), repr(progress)):
        assert KEY not in text

    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert "hosted.job_created" in logged  # our own log lines were captured ...
    assert any(r.name.startswith("openai") for r in caplog.records)  # ... and the SDK's debug lines
    assert KEY not in logged and WRONG_KEY not in logged

    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(HostedTrainingError) as err:
        OpenAIHostedBackend(http_client=httpx.Client(transport=fake.transport()))
    assert "OPENAI_API_KEY" in err.value.message


def test_metrics_parsing_and_spec_rules(splits):
    assert progress_from_metrics({"train_loss": 1.0}) is None
    p = progress_from_metrics({"step": 10, "total_steps": 40, "train_loss": 0.5, "full_valid_loss": 0.7}, n_epochs=2)
    assert (p.step, p.total_steps, p.epoch, p.train_loss, p.valid_loss) == (10, 40, 0.5, 0.5, 0.7)
    assert p.learning_rate is None and p.tokens is None
    assert len(suffix_for(spec_for(splits, suffix="x" * 80))) == 64
    assert suffix_for(spec_for(splits, suffix=None)).startswith("tl-")
    with pytest.raises(ValueError):
        HostedTrainingError("training.gpu_on_fire", "nope")
    with pytest.raises(ValueError):
        spec_for(splits, key="")



def test_reason_codes_are_registered():
    from contracts.reason_codes import REASON_CODES as registered

    from services.trainer.hosted.base import REASON_CODES

    assert REASON_CODES <= registered.keys(), sorted(REASON_CODES - registered.keys())
