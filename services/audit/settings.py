"""Audit service settings (env prefix TUNELINE_AUDIT_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_AUDIT_", extra="ignore", frozen=True)

    # Messages per recorder transaction (and per pull): fewer, larger commits cost PostgreSQL less;
    # a pull returns what is there, so a small load is not held back waiting for a full batch.
    recorder_batch: int = 2000
    recorder_fetch_timeout_s: float = 2.0
    projector_batch: int = 2000
    projector_poll_s: float = 1.0
    # The recorder acks a whole batch after its commit and sends no heartbeat while it commits: a slow
    # commit must not have its messages redelivered under it.
    ack_wait_s: float = 30.0
