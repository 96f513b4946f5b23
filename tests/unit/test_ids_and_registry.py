"""Deterministic event ids, the registry's next version, and subject names."""

from __future__ import annotations

import re
import uuid

import pytest

from contracts import subjects
from contracts.subjects import dlq_subject, is_subject_token, registry_target_filter, subject_for
from services.common.ids import dead_letter_event_id, derived_event_id, new_run_id
from services.registry.domain import next_version

TRIGGER = uuid.UUID("12345678-1234-5678-1234-567812345678")


def nats_match(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


# --- ids -------------------------------------------------------------------------------------


def test_derived_event_id_is_the_same_for_a_redelivered_trigger():
    assert derived_event_id(TRIGGER, "emit") == derived_event_id(uuid.UUID(str(TRIGGER)), "emit")


def test_derived_event_id_differs_per_step_and_per_trigger():
    steps = ["emit", ":10", ":20", "failure", ""]
    ids = {derived_event_id(TRIGGER, s) for s in steps}
    assert len(ids) == len(steps)
    assert derived_event_id(uuid.uuid4(), "emit") != derived_event_id(TRIGGER, "emit")
    assert TRIGGER not in ids


def test_derived_event_id_is_a_stable_uuid5():
    eid = derived_event_id(TRIGGER, "emit")
    assert eid.version == 5
    assert eid == uuid.uuid5(TRIGGER, "emit")  # pinned: changing the scheme breaks dedup of in-flight runs


def test_dead_letter_ids_are_deterministic_per_consumer_and_sequence():
    assert dead_letter_event_id("prep", 7) == dead_letter_event_id("prep", 7)
    assert len({dead_letter_event_id("prep", 7), dead_letter_event_id("prep", 8),
                dead_letter_event_id("ingest", 7)}) == 3


def test_new_run_ids_are_fresh_and_well_formed():
    ids = {new_run_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"run-[0-9a-f]{16}", i) for i in ids)
    assert all(is_subject_token(i) for i in ids)


# --- registry --------------------------------------------------------------------------------


def test_first_version_of_a_target_is_one():
    assert next_version(None) == 1


@pytest.mark.parametrize("current, expected", [(1, 2), (9, 10), ("41", 42)])
def test_next_version_counts_up_from_the_last_registry_event(current, expected):
    assert next_version({"type": "registry.version_registered", "payload": {"version": current}}) == expected


# --- subjects --------------------------------------------------------------------------------


def test_commands_go_under_the_command_root():
    assert subject_for("run.start", kind="command") == "tuneline.cmd.run.start"
    assert nats_match(subjects.STREAM_SUBJECTS[1], subject_for("run.start", kind="command"))


@pytest.mark.parametrize("etype", ["ingest.committed", "prep.prepared", "training.progress", "bus.message_dead_lettered"])
def test_events_go_under_the_event_root_and_into_the_stream(etype):
    subject = subject_for(etype, kind="event")
    assert subject == f"tuneline.evt.{etype}"
    assert any(nats_match(p, subject) for p in subjects.STREAM_SUBJECTS)
    assert not any(nats_match(p, subject) for p in subjects.DLQ_SUBJECTS)


def test_registry_events_with_a_target_go_on_the_targets_subject():
    subject = subject_for("registry.version_registered", kind="event", target="support-intents")
    assert subject == "tuneline.evt.registry.support-intents.version_registered"
    assert nats_match(registry_target_filter("support-intents"), subject)
    assert any(nats_match(p, subject) for p in subjects.STREAM_SUBJECTS)


def test_a_targets_filter_does_not_see_another_targets_events():
    for other in ("support", "support-intents-2", "SUPPORT-INTENTS"):
        subject = subject_for("registry.version_registered", kind="event", target=other)
        assert not nats_match(registry_target_filter("support-intents"), subject), other


def test_registry_events_without_a_target_use_the_plain_event_subject():
    assert subject_for("registry.failed", kind="event") == "tuneline.evt.registry.failed"


def test_a_non_registry_event_ignores_the_target():
    assert subject_for("export.completed", kind="event", target="t") == "tuneline.evt.export.completed"


@pytest.mark.parametrize("target", ["a.b", "a b", "*", ">", "", "a*", "tab\t", "ü"])
def test_registry_target_filter_refuses_targets_that_are_not_one_subject_token(target):
    with pytest.raises(ValueError):
        registry_target_filter(target)
    with pytest.raises(ValueError):
        subject_for("registry.version_registered", kind="event", target=target)


@pytest.mark.parametrize("target", ["a", "support-intents", "Model_2", "0"])
def test_registry_target_filter_accepts_single_tokens(target):
    assert registry_target_filter(target) == f"tuneline.evt.registry.{target}.>"


def test_dead_letters_go_to_the_dlq_stream_only():
    subject = dlq_subject("prep-ingest-committed")
    assert subject == "tuneline.dlq.prep-ingest-committed"
    assert any(nats_match(p, subject) for p in subjects.DLQ_SUBJECTS)
    assert not any(nats_match(p, subject) for p in subjects.STREAM_SUBJECTS)


def test_a_target_with_a_trailing_newline_is_refused():
    assert not is_subject_token("support-intents\n")
    with pytest.raises(ValueError):
        registry_target_filter("support-intents\n")
