"""The audit events that record each replay (who, what, which range, the outcome), built from the replay's
report the same way for the CLI and the API: (payload, severity, reason code)."""

from __future__ import annotations

from contracts.envelope import Severity
from contracts.events import ConsumerReplayed, ProjectionReplayed, StoreReplayed

Recorded = tuple[object, Severity, str | None]


def projection_event(report, actor: str) -> Recorded:
    event = ProjectionReplayed(
        projection=report.projection, requested_by=actor, to_position=report.position, events=report.events,
        live_version=report.live_version, version=report.version,
        differences={t: d.total for t, d in report.differences.items()}, outcome=report.outcome,
        forced=report.forced, wall_s=round(report.wall_s, 3))
    if report.identical:
        return event, Severity.INFO, None
    return event, Severity.WARNING, "audit.projection_differs"


def projection_failed(projection: str, actor: str, error: Exception) -> Recorded:
    return (ProjectionReplayed(projection=projection, requested_by=actor, to_position=0, events=0, live_version=1,
                               version=1, outcome="failed", error=str(error)[:2000], wall_s=0.0),
            Severity.ERROR, "audit.projection_replay_failed")


def store_event(report, actor: str) -> Recorded:
    event = StoreReplayed(
        requested_by=actor, into=report.into, stream_first=report.stream_first, stream_last=report.stream_last,
        events=report.events, compared_from=report.diff.compared_from, compared_to=report.diff.compared_to,
        differences=dict(report.diff.counts), samples=report.diff.samples[:20],
        outcome="identical" if report.identical else "differs", wall_s=round(report.wall_s, 3))
    if report.identical:
        return event, Severity.INFO, None
    return event, Severity.ERROR, "audit.store_differs"


def store_failed(into: str, actor: str, error: Exception) -> Recorded:
    return (StoreReplayed(requested_by=actor, into=into, stream_first=0, stream_last=0, events=0, compared_from=0,
                          compared_to=0, outcome="failed", error=repr(error)[:2000], wall_s=0.0),
            Severity.ERROR, "audit.store_replay_failed")


def consumer_event(report, actor: str) -> Recorded:
    event = ConsumerReplayed(
        durable=report.durable, mode=report.mode, from_sequence=report.from_sequence, from_time=report.from_time,
        requested_by=actor, inputs=report.inputs, outputs=report.outputs, differences=report.differences,
        samples=report.samples[:20], outcome=report.outcome, wall_s=round(report.wall_s, 3))
    if report.outcome == "differs":
        return event, Severity.WARNING, "audit.consumer_outputs_differ"
    return event, Severity.INFO, None


def consumer_failed(durable: str, sandbox: bool, start, actor: str, error: Exception) -> Recorded:
    seq, at = (start, None) if isinstance(start, int) else (None, start.isoformat())
    return (ConsumerReplayed(durable=durable, mode="sandbox" if sandbox else "in_place", from_sequence=seq,
                             from_time=at, requested_by=actor, inputs=0, outcome="failed", error=repr(error)[:2000],
                             wall_s=0.0),
            Severity.ERROR, "audit.consumer_replay_failed")
