"""Tuneline's wire contracts: the envelope, registered event and command types, subjects and reason codes."""

from contracts.envelope import Envelope, Severity, new_event_id
from contracts.reason_codes import REASON_CODES, ReasonCode, is_registered
from contracts.registry import (
    ContractError,
    UnknownEventType,
    decode,
    encode,
    payload_model,
    registered_types,
)

__all__ = [
    "REASON_CODES",
    "ContractError",
    "Envelope",
    "ReasonCode",
    "Severity",
    "UnknownEventType",
    "decode",
    "encode",
    "is_registered",
    "new_event_id",
    "payload_model",
    "registered_types",
]
