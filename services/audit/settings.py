"""Audit service settings (env prefix TUNELINE_AUDIT_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_AUDIT_", extra="ignore", frozen=True)

    recorder_batch: int = 500
    recorder_fetch_timeout_s: float = 2.0
    projector_batch: int = 2000
    projector_poll_s: float = 1.0
