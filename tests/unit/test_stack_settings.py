"""`tuneline up` on a running stack compares the settings its services started with (stack.json) with the
environment now, and says which differ and that a restart applies them; secrets never shown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.cli import main, stack
from tests.unit.cli_support import run_cli


def test_service_settings_are_the_tuneline_variables_urls_and_api_keys():
    env = {"TUNELINE_INGEST_ROOTS": "[]", "TUNELINE_DATA_DIR": "/d", "NATS_URL": "nats://x", "OPENAI_API_KEY": "sk",
           "PATH": "/bin", "HOME": "/root"}
    assert stack.service_settings(env) == {"NATS_URL": "nats://x", "OPENAI_API_KEY": "sk", "TUNELINE_INGEST_ROOTS": "[]"}


def test_default_ingest_roots_are_where_up_ran_and_the_data_dir(tmp_path):
    env = stack.service_env(tmp_path / "data", "nats://n", "postgresql:///db", environ={}, cwd=tmp_path)
    assert json.loads(env["TUNELINE_INGEST_ROOTS"]) == [str(tmp_path.resolve()), str((tmp_path / "data").resolve())]
    set_by_user = stack.service_env(tmp_path, "nats://n", "db", environ={"TUNELINE_INGEST_ROOTS": '["/x"]'}, cwd=tmp_path)
    assert set_by_user["TUNELINE_INGEST_ROOTS"] == '["/x"]'


def test_a_changed_setting_is_named_with_both_values_and_the_restart_that_applies_it():
    running = {"TUNELINE_INGEST_ROOTS": '["/a"]', "TUNELINE_LOG_LEVEL": "INFO"}
    now = {"TUNELINE_INGEST_ROOTS": '["/a", "/b"]', "TUNELINE_LOG_LEVEL": "INFO", "TUNELINE_WORKERS": "2"}
    assert stack.settings_drift(running, now) == [
        'TUNELINE_INGEST_ROOTS: the running services have ["/a"], the environment now has ["/a", "/b"]',
        "TUNELINE_WORKERS: the running services have unset, the environment now has 2",
        "run `tuneline down && tuneline up` to apply",
    ]


def test_equal_or_unrecorded_settings_say_nothing():
    assert stack.settings_drift({"TUNELINE_X": "1"}, {"TUNELINE_X": "1"}) == []
    assert stack.settings_drift(None, {"TUNELINE_X": "1"}) == []  # a stack.json from before settings were recorded


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "TUNELINE_HF_TOKEN", "TUNELINE_CLIENT_SECRET",
                                  "TUNELINE_APP_DB_PASSWORD"])
def test_secret_values_are_never_shown(name):
    changed = stack.settings_drift({name: "old-s3cret"}, {name: "new-s3cret"})
    added = stack.settings_drift({}, {name: "new-s3cret"})
    assert changed[0] == f"{name}: the running services have another value than the environment (values hidden)"
    assert added[0] == f"{name}: the running services have unset, the environment now has set (value hidden)"
    assert not any("s3cret" in line for line in changed + added)


def test_a_url_password_is_masked():
    lines = stack.settings_drift({"DATABASE_URL": "postgresql://u:hunter2@h/db"}, {"DATABASE_URL": "postgresql:///db"})
    assert "hunter2" not in lines[0] and "postgresql://u:***@h/db" in lines[0]


@pytest.fixture
def healthy_stack(cli_data_dir, monkeypatch):
    """A stack.json whose services all look alive, with nats-server and PostgreSQL reused as they are."""
    nats, pg = {"url": "nats://127.0.0.1:4999", "managed": True}, {"url": "postgresql:///tuneline", "managed": True}
    monkeypatch.setattr(stack, "service_pids_for", lambda root: {n: [100 + i] for i, n in enumerate(stack.SERVICES)})
    monkeypatch.setattr(main, "_ensure_nats", lambda root, recorded: (nats, False))
    monkeypatch.setattr(main, "_ensure_postgres", lambda root, recorded: (pg, False))
    monkeypatch.chdir(cli_data_dir)

    def record(changes: dict) -> None:
        """stack.json as `up` wrote it in this environment with `changes`."""
        env = stack.service_env(Path(cli_data_dir).resolve(), nats["url"], pg["url"], environ={**os.environ, **changes})
        stack.write_state(cli_data_dir, {"nats": nats, "postgres": pg, "services": {},
                                         "settings": stack.service_settings(env)})
    return record


def test_up_on_a_running_stack_says_which_setting_differs(healthy_stack, cli_data_dir, monkeypatch, capsys):
    monkeypatch.delenv("TUNELINE_INGEST_ROOTS", raising=False)
    healthy_stack({"TUNELINE_INGEST_ROOTS": '["/old"]'})
    code, out, err = run_cli(["up"], capsys)
    assert code == 0 and out.startswith("already up")
    lines = err.strip().splitlines()
    assert lines[0].startswith('TUNELINE_INGEST_ROOTS: the running services have ["/old"], the environment now has [')
    assert lines[-1] == "run `tuneline down && tuneline up` to apply"
    # the services still run with the old value: stack.json keeps saying so, and the next `up` says it again
    assert stack.read_state(cli_data_dir)["settings"]["TUNELINE_INGEST_ROOTS"] == '["/old"]'


def test_up_on_a_running_stack_with_the_same_settings_says_only_already_up(healthy_stack, monkeypatch, capsys):
    monkeypatch.setenv("TUNELINE_INGEST_ROOTS", '["/same"]')
    healthy_stack({"TUNELINE_INGEST_ROOTS": '["/same"]'})
    code, out, err = run_cli(["up"], capsys)
    assert code == 0 and out.startswith("already up") and err == ""
