"""Anthropic as a training backend: refused, honestly (ARCHITECTURE D12).

Anthropic publishes no fine-tuning API: Claude fine-tuning is offered only through Amazon Bedrock. The
Anthropic SDK stays a judge and prompt-baseline provider; every training request made to this backend is
refused with `training.capability_unsupported` before any network call.
"""

from __future__ import annotations

from typing import Any, NoReturn

from services.trainer.hosted.base import (
    CAPABILITY_UNSUPPORTED,
    HostedJobSpec,
    HostedOutcome,
    HostedTrainingError,
    OnEvent,
    OnPoll,
    OnProgress,
)

UNSUPPORTED_MESSAGE = (
    "Anthropic has no public fine-tuning API: Claude fine-tuning is available only through Amazon Bedrock. "
    "Use the Anthropic provider as a judge or prompt baseline, and an OpenAI or OpenAI-compatible host "
    "(or local LoRA) for training."
)


class AnthropicHostedBackend:
    """A HostedBackend that refuses every request. It never calls the client it may be given."""

    def __init__(self, client: Any = None) -> None:
        self._client = client  # kept only so wiring can pass the shared judge client; never used here

    def __repr__(self) -> str:
        return "AnthropicHostedBackend(training=unsupported)"

    def _refuse(self, what: str) -> NoReturn:
        raise HostedTrainingError(CAPABILITY_UNSUPPORTED, f"cannot {what}: {UNSUPPORTED_MESSAGE}")

    def submit(self, spec: HostedJobSpec) -> str:
        self._refuse(f"fine-tune {spec.base_model}")

    def follow(
        self,
        job_id: str,
        on_progress: OnProgress | None = None,
        on_event: OnEvent | None = None,
        poll_interval: float = 10.0,
        timeout: float | None = None,
        *,
        on_poll: OnPoll | None = None,
        since_event_id: str | None = None,
        on_job: Any = None,
    ) -> HostedOutcome:
        self._refuse(f"follow fine-tuning job {job_id}")

    def cancel(self, job_id: str) -> str:
        self._refuse(f"cancel fine-tuning job {job_id}")

    def pause(self, job_id: str) -> str:
        self._refuse(f"pause fine-tuning job {job_id}")

    def resume(self, job_id: str) -> str:
        self._refuse(f"resume fine-tuning job {job_id}")
