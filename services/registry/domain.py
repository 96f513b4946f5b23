"""Registry decisions without I/O: the per-target aggregate's next version."""

from __future__ import annotations


def next_version(last_registry_event: dict | None) -> int:
    """Versions count up per target; the last registry event of the target carries the current one."""
    if last_registry_event is None:
        return 1
    return int(last_registry_event["payload"]["version"]) + 1
