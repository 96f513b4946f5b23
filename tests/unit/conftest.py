"""Fixtures for the unit tests of the `tuneline` CLI's error paths."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli_data_dir(tmp_path, monkeypatch):
    """A data dir of the test's own, and no NATS_URL / DATABASE_URL: nothing reaches a running stack."""
    monkeypatch.setenv("TUNELINE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return tmp_path
