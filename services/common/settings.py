"""Settings shared by every service; each service subclasses with its own env prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Connection settings are read unprefixed (NATS_URL, DATABASE_URL, TUNELINE_DATA_DIR) because
    the whole stack shares them; a service's own knobs carry its prefix, e.g. TUNELINE_TRAINER_."""

    # populate_by_name: ServiceSettings(data_dir=...) works in code and tests, not only the env alias
    model_config = SettingsConfigDict(env_prefix="TUNELINE_", extra="ignore", frozen=True, populate_by_name=True)

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias=AliasChoices("NATS_URL"))
    # The service's own nats-server user (services/common/nats_auth.py): `tuneline up` and docker-compose set
    # them; unset, the service connects without credentials (a server without auth).
    nats_user: str | None = Field(None, validation_alias=AliasChoices("NATS_USER"))
    nats_password: SecretStr | None = Field(None, validation_alias=AliasChoices("NATS_PASSWORD"))
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL"))
    data_dir: Path = Field(Path(".tuneline"), validation_alias=AliasChoices("TUNELINE_DATA_DIR"))
    log_level: str = Field("INFO", validation_alias=AliasChoices("TUNELINE_LOG_LEVEL"))
    # Delivery policy (D4): bounded deliveries, nack backoff, and how long a message may go
    # without an ack or an in-progress heartbeat before the server redelivers it. Every handler
    # heartbeats every ack_wait/3 (handle_delivery), so this is how long a dead worker's message waits
    # for another worker: short, so that a stage restarted after a kill resumes within seconds.
    max_deliver: int = 5
    ack_wait_s: float = 6.0
    nack_backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)

    @property
    def nats_options(self) -> dict[str, str]:
        """Credentials for nats.connect / NatsBroker: empty without NATS_USER and NATS_PASSWORD."""
        from services.common.nats_auth import connect_options

        return connect_options(self.nats_user, self.nats_password.get_secret_value() if self.nats_password else None)

    @property
    def artifact_root(self) -> Path:
        return (self.data_dir / "artifacts").resolve()
