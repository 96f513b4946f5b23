"""Hosted fine-tuning backends (ARCHITECTURE D12), independent of the bus.

`base` holds the backend-neutral vocabulary; `openai_backend` trains on OpenAI or any OpenAI-compatible
host; `anthropic_backend` refuses training (Anthropic has no public fine-tuning API).
"""

from services.trainer.hosted.base import (
    CANCELLED,
    CAPABILITY_UNSUPPORTED,
    RUNTIME_ERROR,
    TIMEOUT,
    HostedBackend,
    HostedCheckpoint,
    HostedEvent,
    HostedJobSpec,
    HostedOutcome,
    HostedProgress,
    HostedTrainingError,
)

__all__ = [
    "CANCELLED",
    "CAPABILITY_UNSUPPORTED",
    "RUNTIME_ERROR",
    "TIMEOUT",
    "HostedBackend",
    "HostedCheckpoint",
    "HostedEvent",
    "HostedJobSpec",
    "HostedOutcome",
    "HostedProgress",
    "HostedTrainingError",
]
