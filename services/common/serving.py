"""Reading the `serving` key-value bucket (D17): target -> what serves it now. The registry writes it
(services/registry/serving.py); gateways and the evaluator (its production baseline, D15) read it."""

from __future__ import annotations

import json

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

BUCKET = "serving"


async def serving_bucket(js):
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        # history: a gateway (or a person) can see the last few switches of a key at a glance
        from services.common.bus import stream_replicas

        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=16, storage=StorageType.FILE,
                                                        description="target -> the version that serves it",
                                                        replicas=stream_replicas()))


async def read(js, target: str) -> dict | None:
    """What serves `target` now, or None (nothing promoted yet)."""
    kv = await serving_bucket(js)
    try:
        entry = await kv.get(target)
    except KeyNotFoundError:
        return None
    return json.loads(entry.value) if entry.value else None
