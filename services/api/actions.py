"""Acting through the bus (D18): the API never writes state. Each action is a registered command published
on `tuneline.cmd.<type>`; the owning service answers with an event caused by it (causation_id = the
command's event id), which the caller gets back, or a 202 with the command id when it does not wait."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import subjects
from services.common.bus import publish
from services.common.commands import envelope_of, publish_and_wait
from services.common.ids import new_run_id

PRODUCER = "api"


@dataclass
class Sent:
    command_id: str
    run_id: str
    answer: dict | None  # the answering event as a dict; None: not waited for, or no answer in time


async def send(js, cmd, *, run_id: str | None = None, run_prefix: str = "run", wait: bool = True,
               timeout: float = 60.0) -> Sent:
    """Publish `cmd` (into `run_id`, else as the first event of a new run) and, with `wait`, return the
    event that answers it."""
    if run_id is None:
        run_id = new_run_id() if run_prefix == "run" else f"{run_prefix}-{new_run_id()}"
    env = envelope_of(cmd, run_id, PRODUCER)
    if not wait:
        await publish(js, env, subjects.subject_for(env.type, kind="command"))
        return Sent(str(env.event_id), run_id, None)
    return Sent(str(env.event_id), run_id, await publish_and_wait(js, env, timeout))
