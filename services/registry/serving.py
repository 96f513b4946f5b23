"""The `serving` key-value bucket (D17): target -> what serves it, projected from the target's registry log.
Gateways watch it and switch without a redeploy; it is never the source of an answer about the past
(`tuneline serving --at` folds the log)."""

from __future__ import annotations

import json

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.common.logging import get_logger
from services.common.serving import BUCKET, read, serving_bucket  # noqa: F401 (the registry's readers too)
from services.registry.domain import TargetState, serving_entry

log = get_logger(__name__)


async def project(js, state: TargetState, attempts: int = 5) -> dict | None:
    """Write the target's serving entry unless the bucket already holds one from a later point of the log
    (two registry processes may finish out of order): compare-and-set on the key's revision."""
    entry = serving_entry(state)
    if entry is None:
        return None
    kv = await serving_bucket(js)
    data = json.dumps(entry, sort_keys=True).encode()
    for _ in range(attempts):
        try:
            current = await kv.get(state.target)
        except KeyNotFoundError:
            current = None
        revision = 0
        if current is not None and current.value:
            revision = current.revision
            try:
                if json.loads(current.value).get("log_sequence", 0) >= entry["log_sequence"]:
                    return entry  # as new as ours, or newer
            except ValueError:
                pass
        elif current is not None:
            revision = current.revision  # a deleted key's marker
        try:
            await kv.update(state.target, data, last=revision)
            log.info("serving_updated", target=state.target, version=entry["version"], log_sequence=entry["log_sequence"])
            return entry
        except KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"serving bucket: key {state.target} kept changing under {attempts} updates")
