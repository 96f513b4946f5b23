"""Prep settings (env prefix TUNELINE_PREP_): the service's default cleaning policy (a run's plan
may override it field by field) and what the hosted-training cost estimate assumes."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.prep.clean import CleaningPolicy


class PrepSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_PREP_", extra="ignore", frozen=True)

    pii_block_threshold: float = CleaningPolicy.pii_block_threshold
    outlier_block_threshold: float = CleaningPolicy.outlier_block_threshold
    quality_threshold: float = CleaningPolicy.quality_threshold
    synthetic_cap: float = CleaningPolicy.synthetic_cap
    hosted_model: str = "gpt-4o-mini-2024-07-18"
    hosted_epochs: int = 3

    def policy(self) -> CleaningPolicy:
        return CleaningPolicy(pii_block_threshold=self.pii_block_threshold,
                              outlier_block_threshold=self.outlier_block_threshold,
                              quality_threshold=self.quality_threshold, synthetic_cap=self.synthetic_cap)
