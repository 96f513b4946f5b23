"""The stack `tuneline up` starts has a NATS user per service (services/common/nats_auth.py): each service
process runs as its own user, the passwords are kept mode 0600 under the data dir, and no password reaches
stack.json, a log or a run's events."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from services.cli import stack
from services.common.nats_auth import credentials_path, read_credentials

pytestmark = [pytest.mark.e2e, pytest.mark.connected]


def test_each_service_runs_as_its_own_nats_user_and_no_password_leaks(cli):
    state = stack.read_state(cli.data)
    passwords = read_credentials(cli.data)
    assert passwords and credentials_path(cli.data).stat().st_mode & 0o777 == 0o600
    for name in stack.SERVICES:
        for pid in stack.replica_pids(state["services"][name]):
            env = stack._proc_environ(pid)
            assert env is not None and env.get("NATS_USER") == name, (name, env and env.get("NATS_USER"))
            assert env.get("NATS_PASSWORD") == passwords[name]

    # the stack refuses a connection without credentials and a wrong password
    async def refused(**kw):
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(state["nats"]["url"], allow_reconnect=False, max_reconnect_attempts=0, **kw)

    asyncio.run(refused())
    asyncio.run(refused(user="prep", password="guess"))

    # the CLI acts as `cli`; `status` works with it
    assert json.loads(cli("status", "--json").stdout)["services"]["audit"]["alive"]

    texts = {"stack.json": stack.state_path(cli.data).read_text()}
    for log in (cli.data / "logs").glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    nats_log = state["nats"].get("log")
    if nats_log:
        texts["nats-server.log"] = open(nats_log, errors="replace").read()
    proc = cli("events", "--run", "run-none", "--json", check=False)  # any output the CLI gives
    texts["cli"] = proc.stdout + proc.stderr
    for where, text in texts.items():
        leaked = [user for user, pw in passwords.items() if pw in text]
        assert not leaked, f"{where} holds the password of {leaked}"
