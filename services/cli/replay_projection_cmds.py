"""`tuneline replay projection NAME [--switch] [--drop VERSION]`: rebuild a projection blue/green (D8,
services/audit/replay.py): build version N+1 from run_events beside N with a progress bar, compare them row by
row, switch readers to N+1 when identical (or with --switch), keep N until dropped. Every replay, failed ones
too, is recorded on the bus as a `projection.replayed` event: who, what, up to which position, the outcome.

Exit status: 0 switched to an identical version; 1 the versions differ (kept aside, or switched with
--switch: both worth a look) or the rebuild failed; 2 refused (an unknown projection, dropping the live
version)."""

from __future__ import annotations

import asyncio
import json
import sys

from services.audit import replay_events
from services.cli.replay_cmds import publish_replayed


def _rebuild(dsn: str, args, show_progress: bool, nats_url: str | None = None):
    from services.audit.replay import rebuild_beside

    if args.projection == "serving":  # a key-value bucket, a few keys: no progress to show
        from services.audit import replay_serving

        return asyncio.run(replay_serving.rebuild_beside(nats_url, dsn, actor=args.actor, switch=args.switch))
    if not show_progress:
        return asyncio.run(rebuild_beside(dsn, args.projection, actor=args.actor, switch=args.switch))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"rebuilding {args.projection}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("replay", total=None)
        return asyncio.run(rebuild_beside(
            dsn, args.projection, actor=args.actor, switch=args.switch,
            on_total=lambda n: bar.update(task, total=n), on_batch=lambda n, _pos: bar.advance(task, n)))


def summary_text(report) -> str:
    where = "bucket" if report.projection == "serving" else "schema"
    lines = [f"{report.projection}: v{report.version} rebuilt from run_events beside v{report.live_version} up to "
             f"position {report.position} ({report.events} events, {report.wall_s:.1f}s)"]
    for table, d in report.differences.items():
        lines.append(f"  {table:<20} " + ("identical" if d.total == 0 else
                                          f"{d.only_live} rows only in v{report.live_version}, "
                                          f"{d.only_new} only in v{report.version}"))
        lines += [f"      {s}" for s in d.samples]
    if report.switched:
        lines.append(f"readers now use v{report.version}" + (" (--switch, although they differ)" if report.forced else "")
                     + f"; v{report.live_version} kept in {where} {report.projection}_v{report.live_version} "
                     f"until `tuneline replay projection {report.projection} --drop {report.live_version}`")
    else:
        lines.append(f"the versions DIFFER: readers stay on v{report.live_version}; v{report.version} kept aside in "
                     f"{where} {report.projection}_v{report.version} (--switch to use it, --drop {report.version} to drop it)")
    return "\n".join(lines)


def cmd_replay_projection(main, args) -> int:
    from services.audit.projections.timeline import ProjectionError
    from services.audit.replay import ReplayRefused, drop_version

    nats_url, dsn = main.urls()
    prefix = f"tuneline replay projection {args.projection}"
    if args.drop is not None:
        try:
            if args.projection == "serving":
                from services.audit import replay_serving

                asyncio.run(replay_serving.drop_version(nats_url, dsn, args.drop))
            else:
                asyncio.run(drop_version(dsn, args.projection, args.drop))
        except ReplayRefused as exc:
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 2
        print(f"{args.projection} v{args.drop} dropped")
        return 0
    try:
        report = _rebuild(dsn, args, show_progress=not args.json and sys.stderr.isatty(), nats_url=nats_url)
    except ReplayRefused as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 2
    except ProjectionError as exc:
        failed, severity, reason_code = replay_events.projection_failed(args.projection, args.actor, exc)
        asyncio.run(publish_replayed(main, failed, severity=severity, reason_code=reason_code))
        print(f"{prefix}: [audit.projection_replay_failed] {exc}; the live version is unchanged", file=sys.stderr)
        return 1
    event, severity, reason_code = replay_events.projection_event(report, args.actor)
    event_id = asyncio.run(publish_replayed(main, event, severity=severity, reason_code=reason_code))
    if args.json:
        print(json.dumps({**event.model_dump(mode="json"), "identical": report.identical,
                          "samples": {t: d.samples for t, d in report.differences.items()},
                          "event_id": event_id}, indent=2))
    else:
        print(summary_text(report))
        print(f"recorded as projection.replayed {event_id}")
    return 0 if report.identical else 1


def add_parser(rsub, main) -> None:
    """The `projection` verb under `tuneline replay` (services/cli/replay_cmds.py makes the group)."""
    from services.cli.registry_cmds import default_actor

    p = rsub.add_parser("projection", help="rebuild a projection blue/green from run_events, compare, switch")
    from services.audit.replay import NAMES

    p.add_argument("projection", choices=list(NAMES), help="timeline, history, failure_clusters (the timeline, "
                   "compared also as clusters), serving (the key-value bucket)")
    p.add_argument("--switch", action="store_true", help="switch readers to the new version even if it differs")
    p.add_argument("--drop", type=int, default=None, metavar="VERSION", help="drop a version that is not live")
    p.add_argument("--actor", default=default_actor(), help="who asks (recorded in projection.replayed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=lambda a: cmd_replay_projection(main, a))
