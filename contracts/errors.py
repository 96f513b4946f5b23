"""The one shape of a refusal or failure that names why: a registered reason code (contracts/reason_codes.py,
docs/reason-codes.md) and a message for a person. Every stage, source, command and tool raises a subclass, so
a handler that reports failures reads `reason_code` and `message` from any of them alike."""

from __future__ import annotations


class ReasonCodedError(Exception):
    """`reason_code`: a registered code saying why; `message`: what a person needs to act on it."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
