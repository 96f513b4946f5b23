"""API settings (env prefix TUNELINE_API_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_API_", extra="ignore", frozen=True, populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8321, ge=0, le=65535)
    # An idle SSE stream sends a comment this often: proxies keep it open, and a client that went away is
    # noticed (the write fails) and its bus subscription dropped.
    sse_ping_s: float = Field(15.0, gt=0)
    # How long an acting request waits for the owning service's answer before it returns 202.
    answer_timeout_s: float = Field(60.0, gt=0)
    pool_size: int = Field(10, ge=1, le=100)
    # uvicorn worker processes on the one port; each has its own pool and bus connection (its SSE clients'
    # subscriptions are its own).
    workers: int = Field(1, ge=1, le=16)
