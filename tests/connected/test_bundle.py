"""A run's support bundle from the API and the CLI against a real nats-server and PostgreSQL: its events,
the ids that find its logs, its manifest and artifact references, the environment's versions, and no secret
of the environment it was made in, even where the run's own events carry one."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from contracts.events import TrainingFailed
from contracts.envelope import Severity
from services.audit.app import AuditService
from services.audit.settings import AuditSettings
from services.common.artifacts import ArtifactStore
from services.common.bus import publish
from tests.conftest import wait_for
from tests.connected.test_api import api, subject_of  # noqa: F401 - the API fixture: audit service, API, tokens
from tests.factories import envelope, plan, successful_run

pytestmark = pytest.mark.connected

RUN = "run-bundled"
API_KEY = "sk-test-" + "Q7x" * 10
DB_PASSWORD = "hunter2-bundle-pw"
MANIFEST = {"dataset_version": "abc", "label_space": ["a", "b"], "train_rows": 160, "source_sha256": "0" * 64}


def with_secrets(monkeypatch, database: str) -> str:
    """An API key in the environment and a password in DATABASE_URL (the test server trusts its socket, so
    the URL still connects); returns that URL."""
    url = database.replace("://postgres:@", f"://postgres:{DB_PASSWORD}@")
    assert DB_PASSWORD in url
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


async def record_run(js, database, tmp_path) -> list:
    """A run whose manifest is a real artifact and whose failure message quotes both secrets (as a driver's
    error might), recorded in run_events."""
    manifest = ArtifactStore(tmp_path / "artifacts").put_bytes(json.dumps(MANIFEST).encode())
    envs = successful_run(RUN)[:4]
    prepared = next(i for i, e in enumerate(envs) if e.type == "prep.prepared")
    envs[prepared] = envs[prepared].model_copy(
        update={"payload": {**envs[prepared].payload, "manifest": manifest.model_dump(mode="json")}})
    leak = (f"connect to postgresql://postgres:{DB_PASSWORD}@db:5432/tuneline failed; "
            f"Authorization: Bearer {API_KEY}")
    envs.append(envelope(TrainingFailed(stage="trainer", message=leak, trigger_type="prep.prepared", plan=plan()),
                         run_id=RUN, causation=envs[-1], severity=Severity.ERROR,
                         reason_code="training.runtime_error", producer="trainer"))
    for env in envs:
        await publish(js, env, subject_of(env))
    import asyncpg

    conn = await asyncpg.connect(database)
    await wait_for(lambda: conn.fetchval("SELECT count(*) = $1 FROM run_events WHERE run_id = $2", len(envs), RUN))
    await conn.close()
    return envs


@pytest.fixture
async def recorder(js, nats_server, database, tmp_path):
    """The audit service recording the bus into run_events (what the CLI reads)."""
    audit = AuditService(AuditSettings(nats_url=nats_server.url, database_url=database, data_dir=tmp_path / "d",
                                       projector_poll_s=0.1))
    await audit.prepare_broker()
    await audit.broker.start()
    yield audit
    await audit._shutdown()
    await audit.broker.stop()


def members(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name).decode() for name in z.namelist()}


def assert_bundle_of(files: dict[str, str], envs: list) -> None:
    assert set(files) == {"README.txt", "run.json", "events.jsonl", "artifacts.json", "environment.json",
                          "manifest.json"}
    events = [json.loads(line) for line in files["events.jsonl"].splitlines()]
    assert [e["event_id"] for e in events] == [str(e.event_id) for e in envs]
    summary = json.loads(files["run.json"])
    assert summary["run_id"] == RUN and summary["correlation_ids"] == [RUN]
    assert [e["event_id"] for e in summary["event_ids"]] == [str(e.event_id) for e in envs]
    assert summary["failures"][0]["reason_code"] == "training.runtime_error"
    assert any(f'"run_id": "{RUN}"' in line for line in summary["find_logs"])
    arts = json.loads(files["artifacts.json"])
    names = {a["name"] for a in arts["artifacts"]}
    assert {"ingest.committed.dataset", "ingest.committed.rejected", "prep.prepared.manifest",
            "prep.prepared.train"} <= names
    assert all(set(a) >= {"uri", "sha256", "size"} for a in arts["artifacts"])
    assert arts["manifest"]["included"] and json.loads(files["manifest.json"]) == MANIFEST
    versions = json.loads(files["environment.json"])["versions"]
    assert set(versions) == {"python", "torch", "transformers", "peft", "tuneline", "nats-server", "postgres"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", versions["nats-server"]) and versions["postgres"][:2].isdigit()
    assert "***" in next(e for e in events if e["type"] == "training.failed")["payload"]["message"]


def assert_no_secret(data: bytes, files: dict[str, str]) -> None:
    for secret in (API_KEY, DB_PASSWORD):
        assert secret.encode() not in data
        for name, text in files.items():
            assert secret not in text, f"{name} carries a secret"


async def test_the_api_bundle_holds_the_runs_events_ids_manifest_and_versions_and_no_secret(
        api, js, database, tmp_path, monkeypatch):  # noqa: F811
    with_secrets(monkeypatch, database)
    envs = await record_run(js, database, tmp_path)
    assert (await api.get(f"/api/runs/{RUN}/bundle")).status_code == 401
    r = await api.get(f"/api/runs/{RUN}/bundle", headers=api.auth_as("viewer"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert f'filename="tuneline-bundle-{RUN}.zip"' in r.headers["content-disposition"]
    files = members(r.content)
    assert_bundle_of(files, envs)
    assert_no_secret(r.content, files)
    missing = await api.get("/api/runs/run-nope/bundle", headers=api.auth_as("viewer"))
    assert missing.status_code == 404 and "run-nope" in missing.json()["detail"]


async def test_the_cli_writes_the_same_bundle_and_no_secret(recorder, js, nats_server, database, tmp_path,
                                                             monkeypatch):
    url = with_secrets(monkeypatch, database)
    envs = await record_run(js, database, tmp_path)
    out = tmp_path / "out" / "bundle.zip"
    env = {**os.environ, "NATS_URL": nats_server.url, "DATABASE_URL": url, "TUNELINE_DATA_DIR": str(tmp_path / "d")}
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "bundle", RUN, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(envs)} events" in proc.stdout and "manifest included" in proc.stdout
    data = out.read_bytes()
    files = members(data)
    assert_bundle_of(files, envs)
    assert_no_secret(data, files)
    assert_no_secret((proc.stdout + proc.stderr).encode(), {})
    nope = subprocess.run([sys.executable, "-m", "services.cli.main", "bundle", "run-nope"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert nope.returncode == 1 and "no events recorded for run run-nope" in nope.stderr
