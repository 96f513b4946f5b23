"""Evaluator settings (env prefix TUNELINE_EVALUATOR_)."""

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class EvaluatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_EVALUATOR_", extra="ignore", frozen=True)
