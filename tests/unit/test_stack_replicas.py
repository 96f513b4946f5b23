"""The embedded stack's replicas and the CLI's NATS credentials (services/cli/stack.py), without servers."""

from __future__ import annotations

import pytest

from services.cli import stack
from services.common.nats_auth import ensure_credentials


def test_parse_replicas():
    assert stack.parse_replicas("trainer=2,evaluator=2") == {"trainer": 2, "evaluator": 2}
    assert stack.parse_replicas(" trainer=3 , ") == {"trainer": 3}
    assert stack.parse_replicas(None) == {} and stack.parse_replicas("") == {}
    for bad, says in (("audit=2", "runs as one instance"), ("api=2", "runs as one instance"),
                      ("gpu=2", "is not a service"), ("trainer", "expected SERVICE=N"),
                      ("trainer=x", "not a number"), ("trainer=0", "between 1 and"), ("trainer=99", "between 1 and")):
        with pytest.raises(ValueError, match=says):
            stack.parse_replicas(bad)


def test_replica_logs_and_pids(tmp_path):
    assert stack.replica_log(tmp_path, "trainer") == tmp_path / "logs" / "trainer.log"
    assert stack.replica_log(tmp_path, "trainer", 2) == tmp_path / "logs" / "trainer-2.log"
    assert stack.replica_pids({"pid": 7, "log": "x"}) == [7]  # a stack.json from before replicas
    assert stack.replica_pids({"pid": 7, "replicas": [{"pid": 7}, {"pid": 9}]}) == [7, 9]
    assert stack.replica_pids(None) == []


def test_the_cli_connects_with_its_own_user_only_to_the_stacks_own_server(tmp_path):
    passwords = ensure_credentials(tmp_path)
    state = {"nats": {"url": "nats://127.0.0.1:4999", "managed": True}}
    url = stack.client_nats_url(tmp_path, "nats://127.0.0.1:4999", state, "cli", environ={})
    assert url == f"nats://cli:{passwords['cli']}@127.0.0.1:4999"
    assert stack.client_nats_url(tmp_path, "nats://127.0.0.1:4999", state, "admin", environ={}).startswith("nats://admin:")
    # another server (NATS_URL): as given, or with NATS_USER/NATS_PASSWORD when set
    assert stack.client_nats_url(tmp_path, "nats://elsewhere:4222", state, "cli", environ={}) == "nats://elsewhere:4222"
    assert stack.client_nats_url(tmp_path, "nats://elsewhere:4222", state, "cli",
                                 environ={"NATS_USER": "u", "NATS_PASSWORD": "p w"}) == "nats://u:p%20w@elsewhere:4222"
    assert stack.client_nats_url(tmp_path, "nats://a:b@elsewhere:4222", state, "cli", environ={}) == "nats://a:b@elsewhere:4222"
    # an external server recorded by `up` (managed: False) gets no stack password
    external = {"nats": {"url": "nats://127.0.0.1:4999", "managed": False}}
    assert stack.client_nats_url(tmp_path, "nats://127.0.0.1:4999", external, "cli", environ={}) == "nats://127.0.0.1:4999"


def test_each_service_gets_its_own_credentials_from_a_managed_server_only(tmp_path):
    passwords = ensure_credentials(tmp_path)
    env = stack.service_credentials(tmp_path, "prep", {"managed": True})
    assert env == {"NATS_USER": "prep", "NATS_PASSWORD": passwords["prep"]}
    assert stack.service_credentials(tmp_path, "prep", {"managed": False}) == {}
    # the settings stack.json records never hold a password
    recorded = stack.service_settings({**env, "NATS_URL": "nats://127.0.0.1:1", "TUNELINE_X": "1"})
    assert passwords["prep"] not in str(recorded)
