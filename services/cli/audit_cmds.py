"""`tuneline audit verify|anchor`: the hash chain over run_events (D19).

`verify [--from POS] [--anchor POS:HASH]` recomputes every row's hash from its values, in position order, and
reports the first row whose values, or whose link to the row before, are not what the recorder hashed:
exit 1. With an anchor (what `anchor` printed earlier and was kept elsewhere) it also checks that the row at
that position still carries that hash, which a rewrite of the whole chain, or of its tail, cannot fake.
`anchor` prints the head: the last row's position and hash."""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _verify(main, start: int, progress: bool):
    from services.audit import chain

    conn = await main._db(main.urls()[1])
    try:
        total = await conn.fetchval("SELECT count(*) FROM run_events WHERE global_position >= $1", start)
        if not progress or not sys.stderr.isatty():
            return await chain.verify(conn, start), total
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as bar:
            task = bar.add_task("chain", total=total)
            result = await chain.verify(conn, start, on_batch=lambda n, _pos: bar.advance(task, n))
        return result, total
    finally:
        await conn.close()


async def _anchor_holds(main, anchor) -> bytes | None:
    conn = await main._db(main.urls()[1])
    try:
        return await conn.fetchval("SELECT hash FROM run_events WHERE global_position = $1", anchor.position)
    finally:
        await conn.close()


def cmd_verify(main, args) -> int:
    from services.audit.chain import ChainHead

    anchor = None
    if args.anchor:
        try:
            anchor = ChainHead.parse(args.anchor)
        except ValueError:
            print(f"tuneline audit verify: --anchor {args.anchor!r} is not POSITION:HASH (as `tuneline audit anchor` "
                  "prints it)", file=sys.stderr)
            return 2
    began = time.perf_counter()
    result, _ = asyncio.run(_verify(main, args.start, not args.json))
    wall = time.perf_counter() - began
    anchored = None
    if anchor is not None:
        stored = asyncio.run(_anchor_holds(main, anchor))
        anchored = stored == anchor.hash
    ok = result.broken is None and anchored is not False
    if args.json:
        print(json.dumps({
            "ok": ok, "checked": result.checked, "first": result.first, "last": result.last,
            "head": None if result.head is None else f"{result.last}:{result.head.hex()}",
            "break": None if result.broken is None else result.broken.__dict__,
            "anchor": None if anchor is None else {"anchor": anchor.text(), "holds": anchored}, "wall_s": round(wall, 3),
        }, indent=2))
        return 0 if ok else 1
    if result.broken is not None:
        b = result.broken
        print(f"chain BROKEN at position {b.position} ({b.kind}): {b.detail}")
        print(f"  {result.checked} rows verified before it" + (f" (positions {result.first}..{result.last})"
                                                             if result.checked else ""))
    elif result.checked == 0:
        print(f"no rows at or after position {args.start}: nothing to verify")
    else:
        print(f"chain intact: {result.checked} rows verified (positions {result.first}..{result.last}) in {wall:.1f}s; "
              f"head {result.last}:{result.head.hex()}")
    if anchor is not None:
        print(f"anchor {anchor.position}:{anchor.hash.hex()[:16]}... "
              + ("holds" if anchored else "does NOT hold: the row at that position carries another hash (or is gone)"))
    return 0 if ok else 1


async def _head(main):
    from services.audit import chain

    conn = await main._db(main.urls()[1])
    try:
        return await chain.head(conn)
    finally:
        await conn.close()


def cmd_anchor(main, args) -> int:
    head = asyncio.run(_head(main))
    if head.position == 0:
        print("run_events is empty: no head to anchor", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"position": head.position, "hash": head.hash.hex(), "anchor": head.text()}))
    else:
        print(head.text())
    return 0


def add_parser(sub, main) -> None:
    au = sub.add_parser("audit", help="the hash chain over run_events: verify it, print its head")
    asub = au.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="recompute the chain and report the first break (exit 1)")
    v.add_argument("--from", dest="start", type=int, default=1, metavar="POS",
                   help="start at this position (linked to the hash stored on the row before it)")
    v.add_argument("--anchor", default=None, metavar="POS:HASH",
                   help="an anchor printed earlier by `tuneline audit anchor`: check it still holds")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=lambda a: cmd_verify(main, a))
    an = asub.add_parser("anchor", help="print the head of the chain (POSITION:HASH) to keep elsewhere")
    an.add_argument("--json", action="store_true")
    an.set_defaults(fn=lambda a: cmd_anchor(main, a))
