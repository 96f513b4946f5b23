"""Deterministic ids for emitted events (D3): a redelivered trigger yields the same ids."""

from __future__ import annotations

import uuid

# A fixed namespace for ids that have no trigger event (dead letters of unparseable messages).
TUNELINE_NAMESPACE = uuid.UUID("6f1d0c1e-5b1a-4c8e-9d1f-7a2b3c4d5e6f")


def derived_event_id(trigger_event_id: uuid.UUID, step: str) -> uuid.UUID:
    return uuid.uuid5(trigger_event_id, step)


def dead_letter_event_id(consumer: str, stream_sequence: int) -> uuid.UUID:
    return uuid.uuid5(TUNELINE_NAMESPACE, f"dead-letter:{consumer}:{stream_sequence}")


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:16]}"
