"""`tuneline bundle RUN [--out FILE]`: the run's support bundle (services/common/bundle.py) as a zip file."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


async def _nats_version(main, nats_url: str) -> str | None:
    """The version of the stack's nats-server, or None when it does not answer: a bundle is most wanted
    when something is down, so that alone does not stop it."""
    from services.common.bundle import nats_server_version

    try:
        nc, _ = await main._js(nats_url)
    except main.StackUnreachable:
        return None
    try:
        return nats_server_version(nc)
    finally:
        await nc.close()


def cmd_bundle(main, args) -> int:
    from services.common.bundle import build_bundle

    nats_url, db_url = main.urls()

    async def go():
        version = await _nats_version(main, nats_url)
        conn = await main._db(db_url)
        try:
            return await build_bundle(conn, args.run_id, nats_server=version, urls=(nats_url, db_url))
        finally:
            await conn.close()

    bundle = asyncio.run(go())
    if bundle is None:
        print(f"no events recorded for run {args.run_id}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path.cwd() / bundle.filename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(bundle.data)
    tmp.replace(out)
    print(f"{out}: support bundle of run {args.run_id}: {bundle.events} events, {bundle.artifacts} artifact "
          f"references, manifest {'included' if bundle.manifest else 'referenced only'}, "
          f"{bundle.scrubbed} secret(s) masked ({len(bundle.data)} bytes)")
    return 0


def add_parser(sub, main) -> None:
    b = sub.add_parser("bundle", help="a run's support bundle: its events, log ids, manifest, artifact references "
                                      "and environment versions, secrets masked, as one zip")
    b.add_argument("run_id", metavar="RUN")
    b.add_argument("--out", metavar="FILE", help="where to write it (default: tuneline-bundle-RUN.zip here)")
    b.set_defaults(fn=lambda a: cmd_bundle(main, a))
