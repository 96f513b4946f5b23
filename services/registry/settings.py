"""Registry settings (env prefix TUNELINE_REGISTRY_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_REGISTRY_", extra="ignore", frozen=True)

    # The targets whose validated versions are promoted without a command (["*"]: every target). A
    # deployment's policy, set by whoever runs the registry, not by whoever starts a run: a run's plan
    # cannot promote itself. Each automatic promotion is an event with actor registry:auto_promote.
    auto_promote: list[str] = Field(default_factory=list)
    # The smoke check before a promotion or restore (the export on its pinned base reproduces the
    # evaluator's outputs on `smoke_rows` test rows). Off: the promotion records that it was skipped.
    smoke: bool = True
    smoke_rows: int = Field(20, ge=1, le=10_000)

    def auto_promotes(self, target: str) -> bool:
        return "*" in self.auto_promote or target in self.auto_promote
