"""Who may publish what (contracts/publishers.py -> services/common/nats_auth.py -> infra/nats/auth.conf):
every registered type is publishable by exactly its publishers, and the committed auth.conf is the one the
contracts give. The server's refusals themselves: tests/connected/test_nats_permissions.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from contracts import publishers, subjects
from contracts.registry import registered_types
from services.cli.stack import NATS_AUTH_CONF, nats_server_binary
from services.common import nats_auth


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(user: str, subject: str) -> bool:
    return any(matches(p, subject) for p in nats_auth.permissions(user)["publish"]["allow"])


def concrete_subjects(type_name: str, kind: str) -> list[str]:
    """Subjects a message of the type is really published on (a target filled in)."""
    out = [subjects.subject_for(type_name, kind=kind)]
    if kind == "event" and (type_name.startswith("registry.") or type_name == subjects.TEST_SET_FROZEN):
        out.append(subjects.subject_for(type_name, kind=kind, target="support-bot"))
    return out


def test_matches_follows_nats_wildcards():
    assert matches("a.*.c", "a.b.c") and not matches("a.*.c", "a.b.c.d")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert not matches("a.b", "a.b.c")


@pytest.mark.parametrize("type_name", sorted(registered_types()))
def test_every_registered_type_is_publishable_by_exactly_its_publishers(type_name):
    mt = registered_types()[type_name]
    expected = set(publishers.publishers_of(type_name))
    assert expected, f"{type_name} has no publisher"
    for subject in concrete_subjects(type_name, mt.kind):
        allowed = {u for u in publishers.USERS if may_publish(u, subject)}
        assert allowed == expected, f"{subject}: publishable by {sorted(allowed)}, owner(s) {sorted(expected)}"
        assert may_publish(nats_auth.ADMIN, subject)


def test_events_belong_to_one_service_and_commands_to_the_api_and_the_cli_only():
    for name, mt in registered_types().items():
        who = publishers.publishers_of(name)
        if mt.kind == "command":
            assert who == publishers.COMMAND_SENDERS
            assert publishers.owner_of(name) in publishers.SERVICES  # a service acts on it
        elif name in publishers.SHARED_EVENTS or name.split(".")[0] in publishers.OPERATOR_RECORDS:
            continue
        else:
            assert len(who) == 1 and who[0] in publishers.SERVICES, f"{name}: {who}"
    # the API and the CLI publish no stage's event: a forged outcome cannot come from them
    for sender in publishers.COMMAND_SENDERS:
        assert not may_publish(sender, subjects.subject_for("registry.promoted", kind="event", target="t"))
        assert not may_publish(sender, subjects.subject_for("training.completed", kind="event"))


def test_a_type_without_an_owner_is_an_error():
    with pytest.raises(publishers.NoOwner):
        publishers.owner_of("nobody.published")


def test_a_service_publishes_no_other_services_event_and_no_command():
    prep = "prep"
    assert may_publish(prep, subjects.subject_for("prep.cleaned", kind="event"))
    assert may_publish(prep, subjects.subject_for(subjects.TEST_SET_FROZEN, kind="event", target="t"))
    assert not may_publish(prep, subjects.subject_for("registry.promoted", kind="event", target="t"))
    assert not may_publish(prep, subjects.subject_for("registry.promoted", kind="event"))
    assert not may_publish(prep, subjects.subject_for("run.start", kind="command"))
    # key-value buckets: only their writer puts keys
    assert may_publish("registry", "$KV.serving.support-bot") and not may_publish("prep", "$KV.serving.support-bot")
    assert may_publish("evaluator", "$KV.eval_scores.k") and not may_publish("registry", "$KV.eval_scores.k")
    # streams are updated, deleted and purged by admin only
    for user in publishers.USERS:
        for op in ("UPDATE", "DELETE", "PURGE"):
            assert not may_publish(user, f"$JS.API.STREAM.{op}.{subjects.STREAM}"), (user, op)
        assert not may_publish(user, f"$JS.API.STREAM.MSG.DELETE.{subjects.STREAM}")
        assert nats_auth.permissions(user)["subscribe"]["allow"] == ["_INBOX.>"]


def test_committed_auth_conf_is_the_generated_one():
    assert nats_auth.AUTH_CONF.read_text() == nats_auth.render_auth_conf(), (
        "infra/nats/auth.conf is stale: run `python -m services.common.nats_auth`")


def test_nats_server_accepts_the_config_with_every_password_set(tmp_path):
    env = {**os.environ, "TUNELINE_NATS_LISTEN": "127.0.0.1:4222", "TUNELINE_NATS_STORE_DIR": str(tmp_path),
           "TUNELINE_NATS_SERVER_NAME": "t", **nats_auth.server_env(nats_auth.new_passwords())}
    ok = subprocess.run([str(nats_server_binary()), "-t", "-c", str(NATS_AUTH_CONF)], env=env,
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    del env[nats_auth.password_variable("prep")]
    missing = subprocess.run([str(nats_server_binary()), "-t", "-c", str(NATS_AUTH_CONF)], env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "TUNELINE_NATS_PASSWORD_PREP" in missing.stdout + missing.stderr


def test_stack_credentials_are_private_and_stable(tmp_path):
    first = nats_auth.ensure_credentials(tmp_path)
    path = nats_auth.credentials_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert set(first) == set(nats_auth.USERS) and len(set(first.values())) == len(first)
    assert nats_auth.ensure_credentials(tmp_path) == first
    url = nats_auth.with_credentials("nats://127.0.0.1:4222", "cli", first["cli"])
    assert url == f"nats://cli:{first['cli']}@127.0.0.1:4222"
