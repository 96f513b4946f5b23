"""Trainer settings (env prefix TUNELINE_TRAINER_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_TRAINER_", extra="ignore", frozen=True)

    # Progress events per run (throttled: one every max_steps / progress_events steps).
    progress_events: int = 10
