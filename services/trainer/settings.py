"""Trainer settings (env prefix TUNELINE_TRAINER_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_TRAINER_", extra="ignore", frozen=True)

    # At most one training.progress event per this many seconds (plus the last step's).
    progress_every_s: float = 2.0
    # A local job running longer than this fails with training.timeout (its checkpoints stay). None: no limit.
    timeout_s: float | None = None
