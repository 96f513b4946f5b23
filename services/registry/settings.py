"""Registry settings (env prefix TUNELINE_REGISTRY_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_REGISTRY_", extra="ignore", frozen=True)
