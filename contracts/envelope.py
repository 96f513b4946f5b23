"""The one envelope every event and command travels in (ARCHITECTURE D2)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contracts.reason_codes import is_registered

ENVELOPE_VERSION = 1


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


def new_event_id() -> uuid.UUID:
    return uuid.uuid4()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Metadata shared by every message; `payload` is validated against the registered type.

    `event_id` doubles as the JetStream `Nats-Msg-Id`, so publishing the same envelope twice is
    deduplicated by the server.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: uuid.UUID = Field(default_factory=new_event_id)
    type: str = Field(min_length=3, pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
    schema_version: int = Field(ge=1)
    run_id: str = Field(min_length=1, max_length=128)
    correlation_id: str = Field(min_length=1, max_length=128)
    causation_id: uuid.UUID | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    producer: str = Field(min_length=1, max_length=64)
    severity: Severity = Severity.INFO
    reason_code: str | None = None
    payload: dict[str, Any]

    @field_validator("reason_code")
    @classmethod
    def _reason_code_registered(cls, value: str | None) -> str | None:
        if value is not None and not is_registered(value):
            raise ValueError(f"reason code {value!r} is not registered in contracts.reason_codes")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone")
        return value
