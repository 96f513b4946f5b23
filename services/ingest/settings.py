"""Ingest settings (env prefix TUNELINE_INGEST_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELINE_INGEST_", extra="ignore", frozen=True)

    # File locators must resolve inside one of these directories (TUNELINE_INGEST_ROOTS, a JSON
    # list). Empty: the service's working directory and its data directory.
    roots: list[Path] = Field(default_factory=list)
    max_row_bytes: int = 1 << 20
    # How long one statement of a pg: source may run (services/ingest/sources/pg.py STATEMENT_TIMEOUT_S).
    pg_statement_timeout_s: float = Field(900.0, gt=0)

    def allowed_roots(self) -> list[Path]:
        return [p.resolve() for p in self.roots] or [Path.cwd().resolve(), self.data_dir.resolve()]

    def limits(self) -> dict:
        return {"max_row_bytes": self.max_row_bytes, "statement_timeout_s": self.pg_statement_timeout_s}
