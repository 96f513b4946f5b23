"""`tuneline up --replicas trainer=2,evaluator=2`: two processes compete on each stage's one durable consumer
(JetStream hands a message to one of them), so concurrent runs spread across them and nothing is done twice;
`status` and `down` know every instance, and a later `up` keeps (and restarts) them. Slow: its own stack and
two runs through the pipeline (`make test-slow`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from services.cli import stack

pytestmark = [pytest.mark.e2e, pytest.mark.connected, pytest.mark.slow]

RUNS = 2
ONCE_PER_RUN = ("training.started", "training.completed", "eval.completed", "export.completed",
                "registry.version_registered")


@pytest.fixture
def scaled(tmp_path):
    data = (tmp_path / "tuneline").resolve()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    env.update(TUNELINE_DATA_DIR=str(data), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def run(*args, check=True, timeout=300):
        proc = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"tuneline {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.data = data
    yield run
    run("down", check=False)
    for pid in stack.nats_pids_for_store(data / "nats" / "jetstream") + [
            p for ps in stack.service_pids_for(data).values() for p in ps]:
        stack.stop_pid(pid)
    stack.stop_postgres(data / "postgres" / "pgdata")


def runs_in_log(path) -> set[str]:
    """The run ids a service instance handled: its log lines carry the trigger's run_id."""
    found = set()
    for line in open(path, errors="replace"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and str(rec.get("run_id", "")).startswith("run-") and rec.get("consumer"):
            found.add(rec["run_id"])
    return found


def wait_terminal(cli, run_id: str, timeout: float = 1500) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        proc = cli("timeline", run_id, "--json", check=False)
        if proc.returncode == 0:
            tl = json.loads(proc.stdout)
            if tl["run"]["status"] in ("succeeded", "failed"):
                return tl
        assert time.monotonic() < deadline, f"{run_id} did not finish"
        time.sleep(1)


@pytest.mark.timeout(3600)
def test_two_trainers_and_two_evaluators_share_the_runs_and_do_nothing_twice(scaled):
    up = scaled("up", "--replicas", "trainer=2,evaluator=2", timeout=300)
    for label in ("trainer[1]", "trainer[2]", "evaluator[1]", "evaluator[2]", "prep ", "audit "):
        assert label in up.stdout, up.stdout
    assert "NOT READY" not in up.stdout
    state = stack.read_state(scaled.data)
    assert state["replicas"] == {"trainer": 2, "evaluator": 2}
    trainers = state["services"]["trainer"]["replicas"]
    assert len(trainers) == 2 and all(stack.service_alive(r["pid"], "trainer") for r in trainers)
    assert len(state["services"]["prep"]["replicas"]) == 1
    status = json.loads(scaled("status", "--json").stdout)
    assert [r["alive"] for r in status["services"]["evaluator"]["replicas"]] == [True, True]

    sample = scaled.data / "sample.jsonl"
    scaled("sample-data", str(sample), "--rows-per-label", "40")
    run_ids = []
    for i in range(RUNS):
        proc = scaled("run", "--locator", f"jsonl:{sample}", "--target", f"scaled-{i}", "--max-steps", "10",
                      "--no-wait")
        run_ids.append(next(w for w in proc.stdout.split() if w.startswith("run-")))
    for run_id in run_ids:
        assert wait_terminal(scaled, run_id)["run"]["status"] == "succeeded", run_id

    for run_id in run_ids:
        types = [e["type"] for e in json.loads(scaled("events", "--run", run_id, "--json").stdout)]
        for t in ONCE_PER_RUN:
            assert types.count(t) == 1, f"{run_id}: {t} x{types.count(t)}"
        assert "bus.message_dead_lettered" not in types
    # no run was handled by both instances of a stage; the runs spread over the trainers (one busy training
    # pulls nothing, so the next run goes to the other; which evaluator is idle first is up to timing)
    for name in ("trainer", "evaluator"):
        handled = [runs_in_log(r["log"]) & set(run_ids) for r in state["services"][name]["replicas"]]
        assert not handled[0] & handled[1], f"{name}: {handled[0] & handled[1]} handled by both instances"
        assert handled[0] | handled[1] == set(run_ids), f"{name} instances handled {handled}"
        if name == "trainer":
            assert all(handled), f"trainer instances handled {handled}: the runs did not spread"

    # a killed instance is restarted by the next `up`, which keeps the replica count it recorded
    os.kill(trainers[1]["pid"], signal.SIGKILL)
    again = scaled("up", timeout=300)
    assert "NOT READY" not in again.stdout
    after = stack.read_state(scaled.data)
    pids = [r["pid"] for r in after["services"]["trainer"]["replicas"]]
    assert len(pids) == 2 and pids[0] == trainers[0]["pid"] and trainers[1]["pid"] not in pids
    assert after["services"]["prep"]["pid"] == state["services"]["prep"]["pid"]

    down = scaled("down")
    assert "trainer       stopped (2 instances)" in down.stdout, down.stdout
    assert not any(stack.pid_alive(p) for p in pids)


def test_replicas_of_a_single_instance_service_or_a_bad_count_are_refused(scaled):
    for arg, says in (("audit=2", "runs as one instance"), ("trainer=0", "between 1 and"),
                      ("trainer=two", "not a number"), ("nope=2", "is not a service")):
        proc = scaled("up", "--replicas", arg, check=False)
        assert proc.returncode == 2 and says in proc.stderr, (arg, proc.stderr)
    assert not (scaled.data / "stack.json").exists()  # refused before anything started
