"""`tuneline up/down/status` on a partly dead stack: up reuses what is alive, restarts what died (the
nats-server on its own port and store, never a second one), and down stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from services.cli import stack

pytestmark = pytest.mark.connected


@pytest.fixture
def cli(tmp_path):
    data = (tmp_path / "tuneline").resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    env.update(TUNELINE_DATA_DIR=str(data), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def run(*args, timeout=180):
        return subprocess.run([sys.executable, "-W", "ignore", "-m", "services.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    run.data = data
    run.store = data / "nats" / "jetstream"
    yield run
    run("down")
    # Whatever the test did, nothing it started may outlive it.
    for pid in stack.nats_pids_for_store(run.store) + [p for ps in stack.service_pids_for(data).values() for p in ps]:
        stack.stop_pid(pid)
    stack.stop_postgres(data / "postgres" / "pgdata")


def up(cli) -> dict:
    proc = cli("up")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "NOT READY" not in proc.stdout
    return stack.read_state(cli.data)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.05)


def service_pids(state: dict) -> dict[str, int]:
    return {name: s["pid"] for name, s in state["services"].items()}


def assert_whole(cli, state: dict) -> None:
    """One nats-server on the store (the recorded one), every service alive and recorded, nothing else."""
    assert stack.nats_pids_for_store(cli.store) == [state["nats"]["pid"]]
    assert set(state["services"]) == set(stack.SERVICES)
    assert stack.service_pids_for(cli.data) == {name: [pid] for name, pid in service_pids(state).items()}
    assert all(stack.service_alive(pid, name) for name, pid in service_pids(state).items())
    assert stack.postgres_alive(cli.data / "postgres" / "pgdata")


def assert_nothing_left(cli, state: dict) -> None:
    proc = cli("down")
    assert proc.returncode == 0, proc.stderr
    assert stack.nats_pids_for_store(cli.store) == []
    assert stack.service_pids_for(cli.data) == {}
    assert not stack.nats_alive(state["nats"]["pid"])
    assert not stack.postgres_alive(cli.data / "postgres" / "pgdata")


def test_up_on_a_healthy_stack_is_a_no_op_and_after_a_dead_service_starts_only_that_one(cli):
    first = up(cli)
    assert_whole(cli, first)
    # files are read from where `up` ran and the data dir, not from the services' working directory
    roots = stack._proc_environ(first["services"]["ingest"]["pid"])["TUNELINE_INGEST_ROOTS"]
    assert json.loads(roots) == [os.getcwd(), str(cli.data)]

    again = cli("up")
    assert again.returncode == 0 and "already up" in again.stdout
    assert stack.read_state(cli.data) == first

    kill(first["services"]["export"]["pid"])
    second = up(cli)
    assert second["nats"] == first["nats"], "a live nats-server is reused, same URL and pid"
    assert second["postgres"] == first["postgres"]
    before, after = service_pids(first), service_pids(second)
    assert after["export"] != before["export"]
    assert {n: p for n, p in after.items() if n != "export"} == {n: p for n, p in before.items() if n != "export"}
    assert_whole(cli, second)
    assert cli("status").returncode == 0
    assert_nothing_left(cli, second)


def test_up_after_the_nats_server_died_restarts_it_on_its_port_and_store_and_restarts_the_services(cli):
    first = up(cli)
    kill(first["nats"]["pid"])

    for args in (("status",), ("status", "--json"), ("run", "--locator", "jsonl:x.jsonl", "--target", "t", "--no-wait")):
        proc = cli(*args)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == f"nats-server at {first['nats']['url']} is not reachable (NoServersError): " \
                                      "run `tuneline up`", proc.stderr

    second = up(cli)
    assert second["nats"]["url"] == first["nats"]["url"], "restarted on the same port"
    assert second["nats"]["pid"] != first["nats"]["pid"]
    assert not set(service_pids(second).values()) & set(service_pids(first).values()), \
        "services are restarted when the nats-server under them was"
    assert_whole(cli, second)
    assert cli("status").returncode == 0
    assert_nothing_left(cli, second)


def test_down_stops_what_stack_json_lost_track_of_and_up_never_runs_two_nats_servers_on_one_store(cli):
    first = up(cli)
    # What the old `up` left behind: a second nats-server on the same store, services stack.json forgot.
    stray = stack.start_nats(cli.data / "nats")
    try:
        assert len(stack.nats_pids_for_store(cli.store)) == 2
        second = up(cli)
        assert second["nats"] == first["nats"]
        assert not stack.nats_alive(stray.pid), "the second writer on the store was stopped"
        assert_whole(cli, second)

        stack.state_path(cli.data).unlink()
        proc = cli("down")
        assert proc.returncode == 0 and "audit" in proc.stdout and "nats-server   stopped" in proc.stdout
        assert stack.nats_pids_for_store(cli.store) == []
        assert stack.service_pids_for(cli.data) == {}
        assert not stack.postgres_alive(cli.data / "postgres" / "pgdata")
    finally:
        stray.stop()
        stray.popen.wait(timeout=15)  # our child: reap it
