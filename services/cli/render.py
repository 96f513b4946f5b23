"""Plain-text rendering of timelines and events for the terminal."""

from __future__ import annotations

from datetime import datetime


def _t(at: datetime) -> str:
    return at.strftime("%H:%M:%S")


def entry_line(e: dict) -> str:
    mark = {"error": "x", "critical": "x", "warning": "!"}.get(e["severity"], " ")
    return f"  {_t(e['occurred_at'])} {mark} {e['stage']:<9} {e['type']:<28} {e['summary']}"


def timeline_text(tl: dict) -> str:
    run = tl["run"]
    lines = [
        f"run {run['run_id']}  target={run['target']}  status={run['status'].upper()}",
        f"  source {run['locator']}",
    ]
    if run["reason_code"]:
        lines.append(f"  failure {run['failure']}")
    lines.append("")
    lines.append("  stage      status      took     last event")
    prev_end = run["started_at"]
    for s in tl["stages"]:
        if s["ended_at"] and prev_end:
            took = f"{(s['ended_at'] - prev_end).total_seconds():6.1f}s"
        else:
            took = f"{'-':>7}"  # a stage still going has taken nothing yet: its time is not known
        lines.append(f"  {s['stage']:<10} {s['status']:<11} {took}  {s['detail']}")
        if s["ended_at"]:
            prev_end = s["ended_at"]
    lines.append("")
    lines.append("  events")
    lines += [entry_line(e) for e in tl["entries"]]
    return "\n".join(lines)
