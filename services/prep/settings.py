"""Prep settings (env prefix TUNELINE_PREP_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class PrepSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_PREP_", extra="ignore", frozen=True)
