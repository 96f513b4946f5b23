"""Messages the API and the CLI put on the bus: a registered command or event in its envelope, and a command
published on `tuneline.cmd.<type>` with a wait for the event that answers it (the owning service's event whose
causation_id is the command's event id)."""

from __future__ import annotations

import asyncio
import json

from nats.js.api import DeliverPolicy

from contracts import subjects
from contracts.envelope import Envelope
from contracts.registry import message_type_of
from services.common.bus import publish


def envelope_of(message, run_id: str, producer: str, **fields) -> Envelope:
    """A registered command or event as an event of `run_id` (its correlation id too), under its type and
    version; `fields`: other envelope fields (severity, reason_code)."""
    mt = message_type_of(message)
    return Envelope(type=mt.name, schema_version=mt.version, run_id=run_id, correlation_id=run_id, producer=producer,
                    payload=message.model_dump(mode="json"), **fields)


async def publish_and_wait(js, env: Envelope, timeout: float) -> dict | None:
    """Publish the command `env` and return the event that answers it as a dict; None: no answer in time."""
    answer: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_msg(msg) -> None:
        try:
            got = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(got, dict) and got.get("causation_id") == str(env.event_id) and not answer.done():
            answer.set_result(got)

    # What the stream stores from now on, consumed before publishing so the answer cannot pass by (a core
    # subscription would also hear an append the stream refused, 10071).
    sub = await js.subscribe(f"{subjects.EVENTS}.>", cb=on_msg, stream=subjects.STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0)
    try:
        await publish(js, env, subjects.subject_for(env.type, kind="command"))
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            return None
    finally:
        await drop_consumer(js, sub)


async def drop_consumer(js, sub) -> None:
    """Unsubscribe and delete the ephemeral consumer now rather than when the server notices no interest."""
    try:
        name = (await sub.consumer_info()).name
    except Exception:  # noqa: BLE001 - already gone
        name = None
    await sub.unsubscribe()
    if name:
        try:
            await js.delete_consumer(subjects.STREAM, name)
        except Exception:  # noqa: BLE001 - the server dropped it first
            pass


async def subscribe_run(js, run_id: str, config, on_event):
    """An ordered, ephemeral consumer over the whole stream (commands too: a run's first message is its
    run.start) from `config`'s start, calling `await on_event(stream_sequence, envelope_dict)` for each
    message of `run_id`; what does not decode is skipped. Drop it with `drop_consumer`."""
    import json

    from contracts import subjects

    async def on_msg(msg) -> None:
        try:
            env = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(env, dict) and env.get("run_id") == run_id:
            await on_event(msg.metadata.sequence.stream, env)

    return await js.subscribe(f"{subjects.ROOT}.>", cb=on_msg, stream=subjects.STREAM, ordered_consumer=True,
                              config=config)
