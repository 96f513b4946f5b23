"""Export settings (env prefix TUNELINE_EXPORT_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ExportSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_EXPORT_", extra="ignore", frozen=True)
