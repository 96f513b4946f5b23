"""Ingest settings (env prefix TUNELINE_INGEST_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_INGEST_", extra="ignore", frozen=True)
