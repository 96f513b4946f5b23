"""`tuneline replay store | consumer | run`: rebuild the store from the bus and diff it with the live one
(services/audit/replay_store.py), re-drive a service's durable consumer in place or in a sandbox
(services/audit/replay_consumer.py), re-run a run from a stage with the same inputs
(services/audit/replay_run.py). Each shows progress, prints a summary, and is recorded on the bus as an event
(store.replayed, consumer.replayed, run.replayed): who, what, which range, the outcome.

Exit status: 0 agreement (or done); 1 a difference found, or the replay failed; 2 refused (bad input)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from services.audit import replay_events
from services.cli.errors import refused
from services.cli.replay_cmds import publish_replayed


@contextlib.contextmanager
def progress(label: str, enabled: bool):
    """(on_total, on_batch) callbacks driving a rich progress bar on a terminal; no-ops otherwise."""
    if not enabled:
        yield (lambda n: None), (lambda n, _pos: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield (lambda n: bar.update(task, total=n)), (lambda n, _pos: bar.advance(task, n))


def _interactive(args) -> bool:
    return not getattr(args, "json", False) and sys.stderr.isatty()


# --- store ------------------------------------------------------------------------------------------


def store_text(r) -> str:
    d = r.diff
    lines = [f"run_events rebuilt from stream {r.stream_first}..{r.stream_last} into {r.into}: {r.events} rows, "
             f"{r.skipped} positions skipped ({r.rebuild_s:.1f}s); compared with the live store over positions "
             f"{d.compared_from}..{d.compared_to} ({r.compare_s:.1f}s)"]
    if r.live_settled < r.stream_last:
        lines.append(f"  the live recorder stands at {r.live_settled}: positions after it are its lag, not compared")
    if not d.hashes_compared:
        lines.append("  the stream starts after position 1 (a retention limit): hashes not compared, the rebuilt "
                     "chain starts there")
    for kind, n in d.counts.items():
        lines.append(f"  {kind:<13} {n}")
    lines += [f"      {s}" for s in d.samples]
    lines.append("the bus and the store AGREE" if r.identical else "the bus and the store DIFFER")
    return "\n".join(lines)


def cmd_replay_store(main, args) -> int:
    from services.audit.replay_store import StoreReplayRefused, replay_store, where

    prefix = "tuneline replay store"
    nats_url, dsn = main.urls()
    with progress("recording the stream", _interactive(args)) as (on_total, on_batch):
        try:
            report = asyncio.run(replay_store(nats_url, dsn, args.into, on_total=on_total, on_batch=on_batch))
        except StoreReplayRefused as exc:
            return refused(prefix, "audit.store_replay_refused", exc)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed replay, then reported
            event, severity, reason_code = replay_events.store_failed(where(args.into), args.actor, exc)
            asyncio.run(publish_replayed(main, event, severity=severity, reason_code=reason_code))
            print(f"{prefix}: [{reason_code}] {exc!r}", file=sys.stderr)
            return 1
    event, severity, reason_code = replay_events.store_event(report, args.actor)
    event_id = asyncio.run(publish_replayed(main, event, severity=severity, reason_code=reason_code))
    if args.json:
        print(json.dumps({**event.model_dump(mode="json"), "identical": report.identical, "skipped": report.skipped,
                          "live_settled": report.live_settled, "hashes_compared": report.diff.hashes_compared,
                          "event_id": event_id}, indent=2))
    else:
        print(store_text(report))
        print(f"recorded as store.replayed {event_id}")
    return 0 if report.identical else 1


# --- consumer ---------------------------------------------------------------------------------------


def consumer_text(r) -> str:
    start = f"sequence {r.from_sequence}" if r.from_sequence else f"time {r.from_time}"
    if r.mode == "in_place":
        return (f"{r.durable} rewound to {start}: {r.inputs} recorded messages of its subject will be delivered "
                f"again (its handlers are idempotent: what it emitted before is deduplicated)")
    lines = [f"{r.durable} replayed in a sandbox from {start}: {r.inputs} recorded inputs, {r.outputs} events "
             f"emitted ({r.wall_s:.1f}s)"]
    for kind, n in r.differences.items():
        lines.append(f"  {kind:<14} {n}")
    lines += [f"      {s}" for s in r.samples]
    lines.append("the outputs are what history recorded" if r.identical else "the outputs DIFFER from history")
    lines.append(f"the sandbox's events are kept in the database {r.sandbox}")
    return "\n".join(lines)


def cmd_replay_consumer(main, args) -> int:
    from services.audit import replay_consumer as rc

    prefix = f"tuneline replay consumer {args.durable}"
    try:
        start = rc.parse_position(args.start)
        rc.consumer_spec(args.durable)
    except rc.ConsumerReplayRefused as exc:
        return refused(prefix, exc.reason_code, exc)
    nats_url, dsn = main.urls()
    try:
        if args.sandbox:
            with progress("replaying in a sandbox", _interactive(args)) as (on_total, on_batch):
                report = asyncio.run(rc.replay_in_sandbox(
                    nats_url, dsn, args.durable, start, sandbox_db=args.sandbox_db, data_dir=main.data_dir(),
                    settle_s=args.settle, on_total=on_total, on_batch=on_batch))
        else:
            report = asyncio.run(rc.redrive_in_place(nats_url, dsn, args.durable, start))
    except rc.ConsumerReplayRefused as exc:
        return refused(prefix, exc.reason_code, exc)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed replay, then reported
        event, severity, reason_code = replay_events.consumer_failed(args.durable, args.sandbox, start, args.actor, exc)
        asyncio.run(publish_replayed(main, event, severity=severity, reason_code=reason_code))
        print(f"{prefix}: [{reason_code}] {exc!r}", file=sys.stderr)
        return 1
    event, severity, reason_code = replay_events.consumer_event(report, args.actor)
    differs = report.outcome == "differs"
    event_id = asyncio.run(publish_replayed(main, event, severity=severity, reason_code=reason_code))
    if args.json:
        print(json.dumps({**event.model_dump(mode="json"), "sandbox": report.sandbox, "event_id": event_id}, indent=2))
    else:
        print(consumer_text(report))
        print(f"recorded as consumer.replayed {event_id}")
    return 1 if differs else 0


# --- run --------------------------------------------------------------------------------------------


def cmd_replay_run(main, args) -> int:
    from services.audit import replay_run as rr

    prefix = f"tuneline replay run {args.run_id}"
    nats_url, dsn = main.urls()
    try:
        started = asyncio.run(rr.rerun(nats_url, dsn, args.run_id, args.stage, actor=args.actor,
                                       new_run_id=args.new_run_id))
    except rr.RunReplayRefused as exc:
        return refused(prefix, exc.reason_code, exc)
    if args.json:
        print(json.dumps(started, indent=2))
    else:
        print(f"{started['run_id']} re-runs {args.run_id} from {args.stage}: its {started['trigger_type']} "
              f"({started['trigger_event_id']}) re-issued with the same inputs")
        print(f"recorded as run.replayed {started['event_id']}; follow it: tuneline follow {started['run_id']}")
    return 0


def add_parsers(rsub, main) -> None:
    """The store, consumer and run verbs under `tuneline replay` (services/cli/replay_cmds.py makes the group)."""
    from services.cli.registry_cmds import default_actor

    s = rsub.add_parser("store", help="rebuild run_events from the JetStream stream into a fresh database, diff it")
    s.add_argument("--into", required=True, metavar="DATABASE_URL",
                   help="the database to rebuild into (created if it does not exist; refused if it holds events)")
    s.add_argument("--actor", default=default_actor(), help="who asks (recorded in store.replayed)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=lambda a: cmd_replay_store(main, a))

    c = rsub.add_parser("consumer", help="re-drive a service's durable consumer from a position, in place or in a "
                                         "sandbox whose outputs are diffed with history")
    c.add_argument("durable", help="the durable consumer's name, e.g. evaluator-training-completed")
    c.add_argument("--from", dest="start", required=True, metavar="SEQ|TIME",
                   help="a stream sequence, or an ISO 8601 time (UTC unless it names an offset)")
    c.add_argument("--sandbox", action="store_true",
                   help="replay into a separate stream and database and diff the outputs with history")
    c.add_argument("--sandbox-db", default=None, metavar="DATABASE_URL",
                   help="the sandbox's database (default: a new one beside the live database)")
    c.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                   help="sandbox: how long the outputs may stay unchanged before the replay counts them done")
    c.add_argument("--actor", default=default_actor(), help="who asks (recorded in consumer.replayed)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=lambda a: cmd_replay_consumer(main, a))

    r = rsub.add_parser("run", help="re-run a run from a stage with the same inputs, as a new run")
    r.add_argument("run_id")
    r.add_argument("--from", dest="stage", required=True,
                   choices=["ingest", "prep", "trainer", "evaluator", "export", "registry"],
                   help="the stage to start from: its recorded trigger is re-issued under a new run id")
    r.add_argument("--run-id", dest="new_run_id", default=None, help="the new run's id (default: a fresh one)")
    r.add_argument("--actor", default=default_actor(), help="who asks (recorded in run.replayed)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=lambda a: cmd_replay_run(main, a))
