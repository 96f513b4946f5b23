"""The `serving` key-value bucket (D17): target -> what serves it, projected from the target's registry log.
Gateways watch it and switch without a redeploy; it is never the source of an answer about the past
(`tuneline serving --at` folds the log)."""

from __future__ import annotations

import json

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

from services.common.logging import get_logger
from services.registry.domain import TargetState, serving_entry

log = get_logger(__name__)

BUCKET = "serving"


async def serving_bucket(js):
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        # history: a gateway (or a person) can see the last few switches of a key at a glance
        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=16, storage=StorageType.FILE,
                                                        description="target -> the version that serves it"))


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


async def read(js, target: str) -> dict | None:
    kv = await serving_bucket(js)
    try:
        entry = await kv.get(target)
    except KeyNotFoundError:
        return None
    return json.loads(entry.value) if entry.value else None
