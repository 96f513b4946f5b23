"""The HTTP API against a real nats-server and PostgreSQL: reads from the projection and run_events,
tokens and roles, commands on the bus (and nothing published for a refused or invalid request), the
live stream and its clean-up, bad input."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import uvicorn

from contracts import subjects
from services.api.app import create_app
from services.api.settings import ApiSettings
from services.audit.app import AuditService
from services.audit.settings import AuditSettings
from services.cli.stack import free_port
from services.common import tokens
from services.common.bus import publish
from tests.conftest import wait_for
from tests.factories import envelope, failed_run, successful_run

pytestmark = pytest.mark.connected


def subject_of(env):
    kind = "command" if env.type == "run.start" else "event"
    return subjects.subject_for(env.type, kind=kind, target=env.payload.get("target"))


@pytest.fixture
async def api(js, nats_server, database, tmp_path):
    """Two recorded runs, the audit service projecting them, the API serving on a free port, and a token per role."""
    envs = successful_run("run-ok") + failed_run("run-bad")
    for env in envs:
        await publish(js, env, subject_of(env))
    audit = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                                       projector_poll_s=0.1))
    await audit.prepare_broker()
    await audit.broker.start()
    settings = ApiSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                           port=free_port(), sse_ping_s=0.2, answer_timeout_s=2.0)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started)
    import asyncpg

    conn = await asyncpg.connect(database)
    for projection in ("timeline", "history"):  # the pages read both
        await wait_for(lambda: conn.fetchval("SELECT position >= $1 FROM projection_checkpoints WHERE projection = $2",
                                             len(envs), projection))
    await conn.close()
    roles = {r: await tokens.create(database, r, f"{r}-person") for r in ("viewer", "operator", "approver")}
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    client.app, client.js, client.envs = app, js, envs
    client.auth_as = lambda role: {"Authorization": f"Bearer {roles[role]}"}
    yield client
    await client.aclose()
    server.should_exit = True
    await serving
    await audit._shutdown()
    await audit.broker.stop()


async def last_seq(js) -> int:
    return (await js.stream_info(subjects.STREAM)).state.last_seq


async def test_reads_need_a_token_and_list_runs_with_filters(api):
    assert (await api.get("/api/runs")).status_code == 401
    assert (await api.get("/api/runs", headers={"Authorization": "Bearer tl_not-a-token"})).status_code == 401
    viewer = api.auth_as("viewer")
    runs = (await api.get("/api/runs", headers=viewer)).json()["runs"]
    assert {r["run_id"] for r in runs} == {"run-ok", "run-bad"}
    failed = (await api.get("/api/runs", params={"status": "failed"}, headers=viewer)).json()["runs"]
    assert [r["run_id"] for r in failed] == ["run-bad"]
    by_code = (await api.get("/api/runs", params={"reason_code": "ingest.source_not_found"}, headers=viewer)).json()
    assert [r["run_id"] for r in by_code["runs"]] == ["run-bad"]
    reached = (await api.get("/api/runs", params={"stage": "registry"}, headers=viewer)).json()["runs"]
    assert [r["run_id"] for r in reached] == ["run-ok"] and reached[0]["stages"]["trainer"] == "succeeded"
    future = (await api.get("/api/runs", params={"since": "2999-01-01T00:00:00Z"}, headers=viewer)).json()
    assert future["runs"] == []


async def test_a_runs_timeline_events_curve_and_failure_clusters(api):
    viewer = api.auth_as("viewer")
    tl = (await api.get("/api/runs/run-ok", headers=viewer)).json()
    assert tl["run"]["status"] == "succeeded" and len(tl["entries"]) == len([e for e in api.envs if e.run_id == "run-ok"])
    page = (await api.get("/api/runs/run-ok/events", params={"limit": 2}, headers=viewer)).json()
    assert [e["type"] for e in page["events"]] == ["run.start", "ingest.committed"] and page["next_after"] == 2
    rest = (await api.get("/api/runs/run-ok/events", params={"after": 2, "type": "training.progress"},
                          headers=viewer)).json()
    assert [e["payload"]["step"] for e in rest["events"]] == [10, 20, 30] and rest["next_after"] is None
    errors = (await api.get("/api/events", params={"severity": "error"}, headers=viewer)).json()["events"]
    assert [e["run_id"] for e in errors] == ["run-bad"]
    curve = (await api.get("/api/runs/run-ok/curve", headers=viewer)).json()
    assert [(p["step"], round(p["loss"], 3)) for p in curve["loss"]] == [(10, 1.0), (20, 0.5), (30, 0.333)]
    clusters = (await api.get("/api/failures", headers=viewer)).json()["clusters"]
    bad = next(c for c in clusters if c["reason_code"] == "ingest.source_not_found")
    assert bad["stage"] == "ingest" and bad["runs"] == 1 and bad["example_runs"] == ["run-bad"]
    assert bad["first_seen"] <= bad["last_seen"]
    targets = (await api.get("/api/targets", headers=viewer)).json()["targets"]
    assert "support-intents" in targets


async def test_unknown_things_are_404_with_a_message_and_bad_filters_422_naming_the_field(api):
    viewer = api.auth_as("viewer")
    for path in ("/api/runs/run-nope", "/api/runs/run-nope/events", "/api/runs/run-nope/curve",
                 "/api/runs/run-nope/stream", "/api/targets/nope", "/api/targets/nope/serving"):
        r = await api.get(path, headers=viewer)
        assert r.status_code == 404, path
        assert "nope" in r.json()["detail"], path
    for params, field in (({"limit": 501}, "limit"), ({"status": "exploded"}, "status"), ({"stage": "x"}, "stage"),
                          ({"since": "yesterday"}, "since"),
                          ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until")):
        r = await api.get("/api/runs", params=params, headers=viewer)
        assert r.status_code == 422, params
        assert field in [e["loc"][-1] for e in r.json()["detail"]], r.json()
    r = await api.get("/api/runs/run-ok/events", params={"severity": "loud"}, headers=viewer)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "severity"
    r = await api.get("/api/targets/support-intents/serving", params={"at": "not-a-time"}, headers=viewer)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "at"


async def test_commands_carry_the_tokens_subject_and_refusals_publish_nothing(api):
    before = await last_seq(api.js)
    body = {"version": "1", "reason": "stale labels"}
    assert (await api.post("/api/targets/support-intents/reject", json=body)).status_code == 401
    r = await api.post("/api/targets/support-intents/reject", json=body, headers=api.auth_as("viewer"))
    assert r.status_code == 403
    r = await api.post("/api/targets/support-intents/reject", json=body, headers=api.auth_as("operator"))
    assert r.status_code == 403
    approver = api.auth_as("approver")
    for bad in ({"version": "1"}, {"version": "1", "reason": "two\nlines"}, {"version": "1", "reason": "x", "extra": 1},
                {"version": "", "reason": "x"}):
        r = await api.post("/api/targets/support-intents/reject", json=bad, headers=approver)
        assert r.status_code == 422, bad
    r = await api.post("/api/targets/no-such-target/reject", json=body, headers=approver)
    assert r.status_code == 404 and "no-such-target" in r.json()["detail"]
    r = await api.post("/api/runs/run-nope/training/pause", json={}, headers=api.auth_as("operator"))
    assert r.status_code == 404
    assert await last_seq(api.js) == before, "a refused or invalid request published something"

    r = await api.post("/api/targets/support-intents/reject", params={"wait": "false"}, json=body, headers=approver)
    assert r.status_code == 202, r.text
    sent = await api.js.get_msg(subjects.STREAM, await last_seq(api.js))
    env = json.loads(sent.data)
    assert sent.subject == "tuneline.cmd.registry.reject" and env["event_id"] == r.json()["command_id"]
    assert env["payload"]["actor"] == "approver-person" and env["producer"] == "api"

    r = await api.post("/api/runs/run-ok/training/pause", json={"reason": "look"}, headers=api.auth_as("operator"))
    assert r.status_code == 202
    env = json.loads((await api.js.get_msg(subjects.STREAM, await last_seq(api.js))).data)
    assert env["type"] == "training.pause" and env["run_id"] == "run-ok" and env["payload"]["requested_by"] == "operator-person"
    # waiting with nobody to answer: 202 with the command id once the wait is over
    r = await api.post("/api/targets/support-intents/reject", json=body, headers=approver)
    assert r.status_code == 202 and r.json()["event"] is None


async def consumers(js) -> int:
    return (await js.stream_info(subjects.STREAM)).state.consumer_count


async def test_the_live_stream_follows_the_bus_and_a_closed_client_leaves_no_subscription(api):
    baseline = await consumers(api.js)
    viewer = api.auth_as("viewer")
    ok = [e for e in api.envs if e.run_id == "run-ok"]
    seen: list[dict] = []
    async with api.stream("GET", "/api/runs/run-ok/stream", headers=viewer) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.aiter_lines()
        async def next_event():
            async for line in lines:
                if line.startswith("data: "):
                    return json.loads(line[6:])
        for _ in ok:
            seen.append(await asyncio.wait_for(next_event(), 10))
        assert api.app.state.feeds.open == 1 and await consumers(api.js) == baseline + 1
        assert [e["type"] for e in seen] == [e.type for e in ok]  # the run so far, from the bus, in order
        assert seen[-1]["stage"] == "registry" and seen[-1]["status"] == "succeeded" and seen[-1]["ends_run"]
        from contracts.events import TrainingProgressed

        live = envelope(TrainingProgressed(step=40, max_steps=40, loss=0.1), run_id="run-ok", producer="trainer")
        await publish(api.js, live, subject_of(live))
        got = await asyncio.wait_for(next_event(), 10)
        assert got["type"] == "training.progress" and got["progress"]["step"] == 40 and got["stage"] == "trainer"
    await wait_for(lambda: api.app.state.feeds.open == 0, timeout=10)
    await wait_for(lambda: _is(consumers(api.js), baseline), timeout=10)


async def _is(value, expected) -> bool:
    return (await value) == expected


async def test_a_stream_resumes_after_the_position_the_page_has_seen(api):
    viewer = api.auth_as("viewer")
    async with api.stream("GET", "/api/runs/run-ok/stream", params={"after": 5}, headers=viewer) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                assert int(line[4:]) == 6
                break


async def test_pages_need_a_login_and_a_viewer_sees_no_buttons(api):
    r = await api.get("/")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    viewer_token = api.auth_as("viewer")["Authorization"].split()[1]
    r = await api.post("/login", content=f"token={viewer_token}&next=/targets/support-intents",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 303 and "tuneline_token" in r.headers["set-cookie"]
    cookies = {"tuneline_token": viewer_token}
    page = await api.get("/targets/support-intents", cookies=cookies)
    assert page.status_code == 200 and "v1" in page.text and "data-action" not in page.text
    page = await api.get("/runs/run-ok", cookies=cookies)
    assert page.status_code == 200 and "<svg" in page.text and "Evaluate" in page.text
    approver_token = api.auth_as("approver")["Authorization"].split()[1]
    page = await api.get("/targets/support-intents", cookies={"tuneline_token": approver_token})
    assert 'data-action="reject"' in page.text
    for path in ("/", "/events?severity=error", "/failures", "/targets"):
        assert (await api.get(path, cookies=cookies)).status_code == 200, path


async def test_up_mints_the_admin_token_once_and_only_its_hash_is_kept(database):
    import asyncpg

    first = await tokens.ensure_admin(database)
    assert first and first.startswith("tl_") and await tokens.ensure_admin(database) is None
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT * FROM api_tokens")
        assert [(r["subject"], r["role"]) for r in rows] == [("admin", "admin")]
        assert first not in json.dumps([dict(r) for r in rows], default=str)
        assert await tokens.lookup(conn, first) == ("admin", "admin")
    finally:
        await conn.close()
    from services.audit.db import connect_as_app

    app = await connect_as_app(database)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the API's role cannot mint tokens
            await app.execute("INSERT INTO api_tokens (token_sha256, token_prefix, subject, role) "
                              "VALUES ('x', 'x', 'me', 'admin')")
    finally:
        await app.close()


async def test_a_run_with_bad_tuning_is_a_422_naming_the_field_and_a_good_one_is_sent_as_plan_v5(api):
    before = await last_seq(api.js)
    operator = api.auth_as("operator")
    plan = {"locator": "jsonl:/x.jsonl", "target": "t"}
    for tuning, field in (({"trials": 0, "budget_minutes": 3}, "trials"), ({"trials": 2, "budget_minutes": 0}, "budget_minutes"),
                          ({"trials": 2, "budget_minutes": 3, "space": {"epochs": []}}, "space")):
        r = await api.post("/api/runs", json={"plan": {**plan, "tuning": tuning}}, headers=operator)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-2:] == ["tuning", field], r.text
    r = await api.post("/api/runs", json={"plan": {**plan, "validation_fraction": 0, "tuning": {"trials": 2, "budget_minutes": 3}}},
                       headers=operator)
    assert r.status_code == 422 and "validation split" in r.text
    assert await last_seq(api.js) == before, "an invalid plan published something"
    r = await api.post("/api/runs", json={"plan": {**plan, "tuning": {"trials": 2, "budget_minutes": 3}}}, headers=operator)
    assert r.status_code == 202, r.text
    env = json.loads((await api.js.get_msg(subjects.STREAM, await last_seq(api.js))).data)
    assert (env["type"], env["schema_version"]) == ("run.start", 5)
    assert env["payload"]["plan"]["tuning"] == {"trials": 2, "budget_minutes": 3.0, "space": {}}
