"""Subject and stream names: the only place they are spelled."""

from __future__ import annotations

import re

STREAM = "RUN_EVENTS"
DLQ_STREAM = "RUN_EVENTS_DLQ"

ROOT = "tuneline"
EVENTS = f"{ROOT}.evt"
COMMANDS = f"{ROOT}.cmd"
DLQ = f"{ROOT}.dlq"

STREAM_SUBJECTS = [f"{EVENTS}.>", f"{COMMANDS}.>"]
DLQ_SUBJECTS = [f"{DLQ}.>"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def is_subject_token(value: str) -> bool:
    return bool(_TOKEN.fullmatch(value))


def registry_target_filter(target: str) -> str:
    """All registry events of one deployment target (the aggregate's stream, D7)."""
    if not is_subject_token(target):
        raise ValueError(f"target {target!r} is not a valid subject token ([A-Za-z0-9_-]+)")
    return f"{EVENTS}.registry.{target}.>"


def test_set_filter(target: str) -> str:
    """A target's frozen test sets (D14): the last message on it is the test set in force."""
    if not is_subject_token(target):
        raise ValueError(f"target {target!r} is not a valid subject token ([A-Za-z0-9_-]+)")
    return f"{EVENTS}.testset.{target}.>"


# Per-target event types and the aggregate subject each lives on.
TEST_SET_FROZEN = "prep.test_set_frozen"


def subject_for(type_name: str, *, kind: str, target: str | None = None) -> str:
    """The subject a message of `type_name` is published on.

    Events: `tuneline.evt.<type>`; registry events are per target:
    `tuneline.evt.registry.<target>.<name>`, and so are a target's frozen test sets:
    `tuneline.evt.testset.<target>.frozen`. Commands: `tuneline.cmd.<type>`.
    """
    if kind == "command":
        return f"{COMMANDS}.{type_name}"
    if type_name.startswith("registry.") and target is not None:
        return registry_target_filter(target)[:-1] + type_name.split(".", 1)[1]
    if type_name == TEST_SET_FROZEN and target is not None:
        return test_set_filter(target)[:-1] + "frozen"
    return f"{EVENTS}.{type_name}"


def publish_subjects(type_name: str, *, kind: str) -> list[str]:
    """Every subject subject_for may give a message of `type_name`, a target as `*` (for permissions:
    services/common/nats_auth.py)."""
    out = [subject_for(type_name, kind=kind)]
    if kind == "event" and type_name.startswith("registry."):
        out.append(f"{EVENTS}.registry.*.{type_name.split('.', 1)[1]}")
    if kind == "event" and type_name == TEST_SET_FROZEN:
        out.append(f"{EVENTS}.testset.*.frozen")
    return out


def dlq_subject(consumer: str) -> str:
    return f"{DLQ}.{consumer}"
