"""A run's events live over Server-Sent Events (D18): each client gets an ordered JetStream consumer of the
stream from the position it has seen (`after`, or the Last-Event-ID its browser resends), so nothing is
missed between the page and the stream and the database is never polled. The consumer is deleted when the
client goes away."""

from __future__ import annotations

import asyncio
import json

from nats.js.api import ConsumerConfig, DeliverPolicy

from services.common.commands import drop_consumer, subscribe_run

# The stage an event belongs to and the status it puts the stage in, for the page's stepper. The timeline
# projection owns the full rules; a live view needs only these, and must not wait for the projection.
STAGE_OF_PREFIX = {"ingest": "ingest", "prep": "prep", "training": "trainer", "preflight": "trainer",
                   "eval": "evaluator", "judge": "evaluator", "export": "export", "registry": "registry"}
SUCCEEDED = {"ingest.committed", "prep.prepared", "training.completed", "eval.completed", "export.completed",
             "registry.version_registered", "registry.hosted_version_registered"}
ENDS_RUN = {"registry.version_registered", "registry.hosted_version_registered"}


def stage_of(event_type: str) -> str:
    return STAGE_OF_PREFIX.get(event_type.split(".", 1)[0], event_type.split(".", 1)[0])


def status_of(event_type: str) -> str | None:
    if event_type.endswith(".failed") or event_type == "preflight.blocked":
        return "failed"
    if event_type == "training.paused":
        return "paused"
    if event_type in SUCCEEDED:
        return "succeeded"
    if event_type.startswith(("training.", "preflight.", "eval.", "judge.", "prep.", "ingest.", "export.")):
        return "running"
    return None


def live_item(seq: int, env: dict) -> dict:
    t = env.get("type", "")
    p = env.get("payload") or {}
    item = {"position": seq, "type": t, "stage": stage_of(t), "status": status_of(t),
            "severity": env.get("severity"), "reason_code": env.get("reason_code"),
            "occurred_at": env.get("occurred_at"),
            "ends_run": t in ENDS_RUN or (status_of(t) == "failed")}
    if t == "training.progress":
        item["progress"] = {k: p.get(k) for k in ("step", "max_steps", "loss", "eval_loss")}
    return item


def sse(data: dict, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return head + f"data: {json.dumps(data, default=str)}\n\n"


class LiveFeeds:
    """The open streams of this process (the test checks that a closed client leaves none)."""

    def __init__(self) -> None:
        self.open = 0


async def run_stream(js, feeds: LiveFeeds, run_id: str, after: int, ping_s: float):
    """The SSE body: the run's events after stream position `after` as they are stored, and a comment every
    ping_s while idle."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

    async def on_event(seq: int, env: dict) -> None:
        await queue.put(live_item(seq, env))

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
    sub = await subscribe_run(js, run_id, config, on_event)
    feeds.open += 1
    try:
        yield ": stream of run " + run_id + "\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), ping_s)
            except TimeoutError:
                yield ": ping\n\n"  # a client that is gone makes this write fail, which ends the stream
                continue
            yield sse(item, item["position"])
    finally:
        feeds.open -= 1
        await asyncio.shield(drop_consumer(js, sub))
