"""Who may publish each registered message type: the source of the bus's per-service permissions.

Every event type has one owner, the service that produces it (named by the type's first part, e.g.
`prep.cleaned` -> prep, `preflight.passed` -> trainer); commands are sent by the API and the CLI only,
and acted on by the service named here. `bus.message_dead_lettered` is the one shared event: every
consumer announces its own dead letters. services/common/nats_auth.py turns this into nats-server users;
a type whose first part is not listed here has no owner, and tests/contract/test_publishers.py fails.
"""

from __future__ import annotations

from contracts import subjects
from contracts.registry import registered_types

# The services that run consumers (they publish events and dead letters) and the two command senders.
SERVICES = ("ingest", "prep", "trainer", "evaluator", "export", "registry", "audit")
COMMAND_SENDERS = ("api", "cli")
USERS = (*SERVICES, *COMMAND_SENDERS)

# An event type's first part -> the service (or sender) that produces it.
EVENT_OWNERS = {
    "ingest": "ingest",
    "prep": "prep",
    "preflight": "trainer",
    "training": "trainer",
    "judge": "evaluator",
    "eval": "evaluator",
    "export": "export",
    "registry": "registry",
}
# Records of an operator's replays (`tuneline replay ...`, services/cli/replay_cmds.py; the API's operator
# endpoints): published by the command senders, the CLI and the API.
OPERATOR_RECORDS = ("gate", "projection", "store", "consumer", "run")
# A command type's first part -> the service that acts on it (the senders are COMMAND_SENDERS).
COMMAND_HANDLERS = {
    "run": "ingest",
    "ingest": "ingest",
    "training": "trainer",
    "registry": "registry",
    "export": "export",  # export.run: `tuneline export RUN --format ...`
}
# Events any consumer publishes about the messages it dead-letters (services/common/delivery.py).
SHARED_EVENTS = {"bus.message_dead_lettered": SERVICES}


class NoOwner(LookupError):
    pass


def owner_of(type_name: str) -> str:
    """The service that produces an event type, or that acts on a command type."""
    mt = registered_types().get(type_name)
    if mt is None:
        raise NoOwner(f"{type_name!r} is not a registered message type")
    table = EVENT_OWNERS if mt.kind == "event" else COMMAND_HANDLERS
    prefix = type_name.split(".", 1)[0]
    if mt.kind == "event" and type_name in SHARED_EVENTS:
        return "*"
    if mt.kind == "event" and prefix in OPERATOR_RECORDS:
        return "cli"
    if prefix not in table:
        raise NoOwner(f"{mt.kind} {type_name!r}: no owner for {prefix!r}.* in contracts/publishers.py")
    return table[prefix]


def publishers_of(type_name: str) -> tuple[str, ...]:
    """The users allowed to publish a type: its owner (events), every consumer (shared events),
    or the API and the CLI (commands)."""
    mt = registered_types()[type_name]
    if mt.kind == "command":
        owner_of(type_name)  # a command nobody acts on is a contract error too
        return COMMAND_SENDERS
    if type_name in SHARED_EVENTS:
        return SHARED_EVENTS[type_name]
    if type_name.split(".", 1)[0] in OPERATOR_RECORDS:
        return COMMAND_SENDERS
    return (owner_of(type_name),)


def subjects_of(type_name: str) -> tuple[str, ...]:
    """Every subject a message of this type may be published on (`*` for a target)."""
    mt = registered_types()[type_name]
    return tuple(subjects.publish_subjects(type_name, kind=mt.kind))


def publish_allowed(user: str) -> list[str]:
    """The message subjects `user` may publish on (sorted, no duplicates)."""
    out: set[str] = set()
    for name in registered_types():
        if user in publishers_of(name):
            out.update(subjects_of(name))
    return sorted(out)
