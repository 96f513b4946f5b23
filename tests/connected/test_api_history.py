"""The API's History, a version's lineage and its counterfactual gate replay, against real PostgreSQL and
nats-server: History is read from the History projection (an event past its checkpoint is not shown until
the projection reads it), a version's page names its dataset, base model, parent version and gate evidence,
and the replay re-runs the recorded decision under another margin / alpha, read-only."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvicorn
import httpx

from contracts.events import GateDecided, VersionRejected
from services.api.app import create_app
from services.api.settings import ApiSettings
from services.audit.db import connect_as_app
from services.audit.projections import history, timeline
from services.cli.stack import free_port
from services.common import tokens
from services.common.artifacts import ArtifactStore
from services.evaluator.gate import GatePolicy, decide
from tests.conftest import wait_for
from tests.connected.test_audit import _COLUMNS, _rows
from tests.connected.test_history import T, _act, lifecycle
from tests.factories import envelope

pytestmark = pytest.mark.connected


def gate_against_v1(store: ArtifactStore) -> GateDecided:
    """run-3's gate: the candidate against production v1 over 60 recorded rows (delta 0.67)."""
    records = []
    for i in range(60):
        b = {"class": "a" if i % 2 else "b"}
        records.append({"row_id": f"r{i}", "model": "candidate", "judge_score": 1.0, "buckets": b})
        records.append({"row_id": f"r{i}", "model": "production:v1", "judge_score": 0.0 if i < 40 else 1.0,
                        "buckets": b})
    ref = store.put_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    cand = [r for r in records if r["model"] == "candidate"]
    d = decide([1.0] * 60, [0.0 if i < 40 else 1.0 for i in range(60)], [r["row_id"] for r in cand],
               [r["buckets"] for r in cand], GatePolicy())
    assert d.passed
    return GateDecided(target=T, passed=True, failed=[], candidate="candidate", baseline="production:v1",
                       baseline_kind="production", records=ref, test_set_sha256="c" * 64, judge_id="exact-match",
                       evidence={**d.as_evidence(), "policy": GatePolicy().as_dict()})


@pytest.fixture
async def api(nats_server, database, tmp_path):
    envs = lifecycle()
    i = max(i for i, e in enumerate(envs) if e.run_id == "run-3" and e.type == "eval.completed")
    envs.insert(i + 1, envelope(gate_against_v1(ArtifactStore(tmp_path / "artifacts")), run_id="run-3",
                                causation=envs[i], producer="evaluator"))
    conn = await connect_as_app(database)
    await conn.copy_records_to_table("run_events", records=_rows(envs, 1), columns=_COLUMNS)
    await history.catch_up(conn)
    await timeline.catch_up(conn)
    settings = ApiSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d", port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started)
    token = await tokens.create(database, "viewer", "vera")
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}", timeout=10,
                               headers={"Authorization": f"Bearer {token}"})
    client.conn, client.envs, client.token = conn, envs, token
    yield client
    await client.aclose()
    server.should_exit = True
    await serving
    await conn.close()


async def test_history_comes_from_the_projection_and_moves_only_when_it_reads_further(api):
    view = (await api.get(f"/api/targets/{T}")).json()
    n = len(api.envs)
    assert view["history_position"] == n
    assert [r["run_id"] for r in view["runs"]] == ["run-5", "run-4", "run-3", "run-2", "run-1"]
    assert {v["version"]: v["status"] for v in view["versions"]} == {3: "production", 2: "rejected", 1: "archived"}
    assert view["production"]["version"] == 3 and view["production"]["by"] == "bob"
    assert {r["run_id"]: r["outcome"] for r in view["runs"]}["run-5"] == "abandoned"
    assert [d["semver"] for d in view["datasets"]][:3] == ["1.0.0", "1.1.0", "2.0.0"]
    last_registry = max(p for p, e in enumerate(api.envs, 1) if e.producer == "registry")
    assert view["last_sequence"] == last_registry
    assert [a["actor"] for a in view["acts"]][:3] == ["dave", "bob", "registry:gate"]  # newest first, cancels too

    # a rejection recorded past History's checkpoint: the API does not refold the registry log to show it
    rejected = _act(VersionRejected(target=T, version=1, actor="erin", reason="stale labels"))
    await api.conn.copy_records_to_table("run_events", records=_rows([rejected], n + 1), columns=_COLUMNS)
    view = (await api.get(f"/api/targets/{T}")).json()
    assert {v["version"]: v["status"] for v in view["versions"]}[1] == "archived"
    assert view["last_sequence"] == last_registry  # the sequence of the History shown, not of the log's head
    await history.catch_up(api.conn)
    view = (await api.get(f"/api/targets/{T}")).json()
    assert {v["version"]: v["status"] for v in view["versions"]}[1] == "rejected"
    assert view["history_position"] == n + 1 and view["last_sequence"] == n + 1
    assert view["acts"][0]["actor"] == "erin" and view["acts"][0]["reason"] == "stale labels"
    page = await api.get(f"/targets/{T}", cookies={"tuneline_token": api.token})
    assert f"History projection (run_events position {n + 1})" in page.text and "stale labels" in page.text


async def test_a_versions_lineage_names_its_dataset_base_model_parent_and_gate_evidence(api):
    v = (await api.get(f"/api/targets/{T}/versions/v3")).json()
    assert v["version"] == 3 and v["run"]["run_id"] == "run-3"
    assert v["dataset"]["semver"] == "2.0.0" and v["dataset"]["label_space"] == ["a", "b", "c"]
    assert v["base_model"] == "/m" and v["parent"]["version"] == 1
    assert v["gate"]["passed"] and v["gate"]["baseline"] == "production:v1"
    assert v["gate"]["words"].startswith("candidate beats the production baseline by 0.667") and "n = 60" in v["gate"]["words"]
    hops = {h["hop"]: h for h in v["lineage"]["hops"]}
    assert hops["training run"]["event_type"] == "training.completed" and hops["export"]["by"] == "sha256"
    assert (await api.get(f"/api/targets/{T}/versions/run-3/lineage")).json()["run_id"] == "run-3"
    first = (await api.get(f"/api/targets/{T}/versions/1")).json()
    assert first["parent"]["version"] is None and first["gate"] is None
    r = await api.get(f"/api/targets/{T}/versions/9")
    assert r.status_code == 404 and r.json()["detail"]["reason_code"] == "registry.version_not_found"
    r = await api.get("/api/targets/bad%20name/versions/1")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "target"]
    page = await api.get(f"/targets/{T}/versions/3", cookies={"tuneline_token": api.token})
    assert page.status_code == 200 and 'id="lineage"' in page.text and "2.0.0" in page.text
    assert "v1, production when it was evaluated" in page.text and 'id="replay-form"' in page.text


async def test_the_gate_replays_under_another_margin_and_alpha_read_only(api):
    before = await api.conn.fetchval("SELECT count(*) FROM run_events")
    same = (await api.get(f"/api/targets/{T}/versions/3/gate-replay", params={"alpha": 0.05})).json()
    assert same["was_passed"] and same["now_passed"] and not same["flipped"] and same["rederived"]
    assert same["n"] == 60 and same["words"].endswith("promotable, as recorded")
    strict = (await api.get(f"/api/targets/{T}/versions/3/gate-replay", params={"min_delta": 0.9})).json()
    assert strict["flipped"] and strict["now_passed"] is False and strict["policy"]["min_delta"] == 0.9
    assert strict["policy"]["alpha"] == strict["recorded_policy"]["alpha"]  # what was not asked stays as recorded
    assert "under margin 0.9 and alpha 0.05" in strict["words"]
    assert "would NOT be promotable (gate." in strict["words"] and strict["words"].endswith("it was promotable")
    assert strict["now_failed"] and all(c.startswith("gate.") for c in strict["now_failed"])
    for bad, field in (({"min_delta": 2}, "min_delta"), ({"alpha": 0}, "alpha"), ({"alpha": "x"}, "alpha")):
        r = await api.get(f"/api/targets/{T}/versions/3/gate-replay", params=bad)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", field], bad
    r = await api.get(f"/api/targets/{T}/versions/2/gate-replay", params={"min_delta": 0.1})
    assert r.status_code == 404 and r.json()["detail"]["reason_code"] == "audit.replay_no_decision"
    page = await api.get(f"/targets/{T}/versions/3", params={"min_delta": "0.9", "alpha": "0.05"},
                         cookies={"tuneline_token": api.token})
    assert 'data-flipped="yes"' in page.text and "it was promotable" in page.text
    r = await api.get(f"/targets/{T}/versions/3", params={"min_delta": "lots"}, cookies={"tuneline_token": api.token})
    assert r.status_code == 422 and "min_delta" in r.text
    assert await api.conn.fetchval("SELECT count(*) FROM run_events") == before  # nothing recorded, nothing changed
