"""Blue/green rebuild of the serving view (D8, D17), which is a JetStream key-value bucket rather than tables.

The equivalent of a version's schema is a bucket of its own: version V, while not live, is the bucket
`serving_v<V>` (target -> entry), built from run_events by folding each target's registry log exactly as the
registry does (services/common/registry_state.py). Gateways watch the bucket named `serving`, so the live
version has to stay under that name: switching writes the new version's entries into `serving` (each with a
compare-and-set on the revision read when comparing, so a promotion landing meanwhile is not overwritten:
the switch is refused and can be asked again), deletes the keys the new version does not hold, and first
copies the live entries into `serving_v<N>`, which stays until dropped (`serving` also keeps each key's
last revisions). projection_versions records the versions, as for the tables.
"""

from __future__ import annotations

import json
import time

import asyncpg
import nats
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NoKeysError

from services.audit.replay import ReplayRefused, ReplayReport, TableDiff, drop_checked, live_version
from services.common.logging import get_logger
from services.common.registry_log import target_log
from services.common.registry_state import fold, serving_entry
from services.common.serving import BUCKET, serving_bucket

log = get_logger(__name__)

NAME = "serving"
_SAMPLES = 5


def bucket_of(version: int) -> str:
    return f"{BUCKET}_v{version}"


async def rebuilt_entries(conn: asyncpg.Connection, position: int) -> dict[str, dict]:
    """target -> serving entry, folded from the registry logs in run_events up to `position`."""
    targets = [r[0] for r in await conn.fetch(
        "SELECT DISTINCT split_part(subject, '.', 4) FROM run_events "
        "WHERE subject LIKE 'tuneline.evt.registry.%' AND global_position <= $1 ORDER BY 1", position)]
    out = {}
    for target in targets:
        events = [(seq, e) for seq, e in await target_log(conn, target) if seq <= position]
        entry = serving_entry(fold(target, events))
        if entry is not None:
            out[target] = entry
    return out


async def _entries(kv) -> dict[str, tuple[dict | None, int]]:
    """key -> (entry, revision) of a bucket; a deleted key reads as (None, revision of its marker)."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    out = {}
    for key in keys:
        e = await kv.get(key)
        out[key] = (json.loads(e.value) if e.value else None, e.revision)
    return out


def compare(live: dict[str, dict], new: dict[str, dict]) -> TableDiff:
    """Key by key: a key whose entries differ counts once on each side, as a changed row does in the tables."""
    only_live = {k: v for k, v in live.items() if new.get(k) != v}
    only_new = {k: v for k, v in new.items() if live.get(k) != v}
    samples = ([f"v-live {k}: {json.dumps(v, sort_keys=True)[:300]}" for k, v in sorted(only_live.items())[:_SAMPLES]]
               + [f"v-new  {k}: {json.dumps(v, sort_keys=True)[:300]}" for k, v in sorted(only_new.items())[:_SAMPLES]])
    return TableDiff(len(only_live), len(only_new), samples)


async def _fresh_bucket(js, name: str, entries: dict[str, dict]):
    try:
        await js.delete_key_value(name)  # a leftover of a failed build under the same number
    except (BucketNotFoundError, nats.js.errors.NotFoundError):
        pass
    kv = await js.create_key_value(KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE,
                                                  description=f"a version of {BUCKET} kept beside it (replay)"))
    for key, entry in entries.items():
        await kv.put(key, json.dumps(entry, sort_keys=True).encode())
    return kv


async def rebuild_beside(nats_url: str, dsn: str, *, actor: str, switch: bool = False) -> ReplayReport:
    """Build the next version of `serving` from run_events beside the live bucket, compare, and switch when
    identical or when `switch`. `dsn` names the database owner."""
    began = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tuneline.replay.' || $1))", NAME)
            live = await live_version(conn, NAME)
            await conn.execute("INSERT INTO projection_versions (projection, version, state) VALUES ($1, $2, 'live')"
                               " ON CONFLICT DO NOTHING", NAME, live)
            new = await conn.fetchval("SELECT max(version) FROM projection_versions WHERE projection = $1", NAME) + 1
            await conn.execute("INSERT INTO projection_versions (projection, version, state, built_by) "
                               "VALUES ($1, $2, 'building', $3)", NAME, new, actor)
        report = ReplayReport(NAME, live, new)
        try:
            report.position = await conn.fetchval("SELECT coalesce(max(global_position), 0) FROM run_events")
            report.events = await conn.fetchval(
                "SELECT count(*) FROM run_events WHERE subject LIKE 'tuneline.evt.registry.%' "
                "AND global_position <= $1", report.position)
            rebuilt = await rebuilt_entries(conn, report.position)
            await _fresh_bucket(js, bucket_of(new), rebuilt)
            live_kv = await serving_bucket(js)
            current = await _entries(live_kv)
            live_entries = {k: v for k, (v, _) in current.items() if v is not None}
            report.differences = {BUCKET: compare(live_entries, rebuilt)}
            report.forced = switch and not report.identical
            if report.identical or switch:
                await _fresh_bucket(js, bucket_of(live), live_entries)  # version N, kept until dropped
                await _switch(live_kv, current, rebuilt)
                report.switched = True
            async with conn.transaction():
                if report.switched:
                    await conn.execute("UPDATE projection_versions SET state = 'retired' "
                                       "WHERE projection = $1 AND version = $2", NAME, live)
                await conn.execute(
                    "UPDATE projection_versions SET state = $3, position = $4, differences = $5::jsonb, "
                    "switched_at = CASE WHEN $3 = 'live' THEN now() END WHERE projection = $1 AND version = $2",
                    NAME, new, "live" if report.switched else "aside", report.position,
                    json.dumps({t: {"only_live": d.only_live, "only_new": d.only_new}
                                for t, d in report.differences.items()}))
        except BaseException:
            await conn.execute("UPDATE projection_versions SET state = 'failed' "
                               "WHERE projection = $1 AND version = $2 AND state = 'building'", NAME, new)
            raise
    finally:
        await nc.close()
        await conn.close()
    report.wall_s = time.perf_counter() - began
    log.info("projection_replayed", projection=NAME, version=new, live_version=live, position=report.position,
             identical=report.identical, switched=report.switched)
    return report


async def _switch(kv, current: dict[str, tuple[dict | None, int]], rebuilt: dict[str, dict]) -> None:
    """Make `serving` hold the rebuilt entries: only the keys that differ are written (gateways see no
    needless update), each compare-and-set on the revision the comparison read."""
    try:
        for key, entry in rebuilt.items():
            value, revision = current.get(key, (None, 0))
            if value != entry:
                await kv.update(key, json.dumps(entry, sort_keys=True).encode(), last=revision)
        for key, (value, revision) in current.items():
            if value is not None and key not in rebuilt:
                await kv.delete(key, last=revision)
    except KeyWrongLastSequenceError as exc:
        raise ReplayRefused(f"the serving bucket changed while the replay compared it (a promotion?): "
                            f"ask again ({exc})") from None


async def drop_version(nats_url: str, dsn: str, version: int) -> None:
    """Drop a version of serving that is not live: its bucket."""

    async def drop_bucket(_conn) -> None:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_key_value(bucket_of(version))
        except (BucketNotFoundError, nats.js.errors.NotFoundError):
            pass
        finally:
            await nc.close()

    await drop_checked(dsn, NAME, version, drop_bucket)
