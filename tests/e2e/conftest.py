"""The e2e stack: one `tuneline up` for the package (every e2e module shares it), `down` at the end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli import stack


@pytest.fixture(scope="package")
def cli(tmp_path_factory):
    data = tmp_path_factory.mktemp("tuneline-e2e")
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    env.update(TUNELINE_DATA_DIR=str(data), HF_HUB_OFFLINE="1")

    def run(*args, check=True, timeout=600):
        proc = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"tuneline {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.data = data
    up = run("up", timeout=180)
    assert "audit" in up.stdout and "NOT READY" not in up.stdout
    yield run
    state = stack.read_state(data)
    run("down", check=False)
    for s in (state or {}).get("services", {}).values():
        assert not stack.pid_alive(s["pid"]), "a service outlived `tuneline down`"


