"""Cancel / pause / resume commands (D5), delivered to every trainer process.

Training commands are not work to share between competing consumers: the process that runs a
run's training must see them, and any process may be the one. So each trainer process follows
`tuneline.cmd.training.>` with its own ordered, ephemeral consumer from the start of the stream
(the commands are few) and keeps the latest state per run in a `Control`. A command that arrives
before the run's training starts (or while no trainer is up) is therefore still honoured: the job
starts cancelled or paused. The commands themselves are in `run_events` like everything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts import subjects
from contracts.registry import ContractError, decode
from services.common.logging import get_logger
from services.trainer.local.engine import Control

log = get_logger(__name__)

CONTROL_SUBJECT = f"{subjects.COMMANDS}.training.>"


class ControlRegistry:
    """run_id -> Control, fed by the command stream; jobs read their run's Control."""

    def __init__(self) -> None:
        self._controls: dict[str, Control] = {}
        self.applied = 0
        self._listeners: dict[str, list[Callable[[str, str], None]]] = {}

    def for_run(self, run_id: str) -> Control:
        return self._controls.setdefault(run_id, Control())

    def listen(self, run_id: str, fn: Callable[[str, str], None]) -> Callable[[], None]:
        """Call fn(action, requested_by) on each later command for run_id; returns an unsubscribe."""
        self._listeners.setdefault(run_id, []).append(fn)
        return lambda: self._listeners.get(run_id, []).remove(fn) if fn in self._listeners.get(run_id, []) else None

    def apply(self, run_id: str, action: str, requested_by: str) -> None:
        control = self.for_run(run_id)
        {"cancel": control.cancel, "pause": control.pause, "resume": control.resume}[action](requested_by)
        self.applied += 1
        for fn in list(self._listeners.get(run_id, [])):
            fn(action, requested_by)
        log.info("training_control", action=action, requested_by=requested_by, run_id=run_id)

    def apply_message(self, data: bytes) -> None:
        try:
            env, payload = decode(data)
        except ContractError as exc:
            # The stream's other consumers (the recorder) dead-letter bad messages; here it is only ignored.
            log.warning("training_control_unreadable", error=str(exc))
            self.applied += 1
            return
        action = env.type.rsplit(".", 1)[-1]
        if action not in ("cancel", "pause", "resume"):
            self.applied += 1
            return
        self.apply(env.run_id, action, payload.requested_by)

    async def follow(self, js: JetStreamContext, catch_up_timeout_s: float = 10.0):
        """Subscribe from the stream's start and wait until every command already stored is applied,
        so no job can start before this process knows it was cancelled."""
        try:
            info = await js.stream_info(subjects.STREAM, subjects_filter=CONTROL_SUBJECT)
            stored = sum((info.state.subjects or {}).values())
        except Exception:  # noqa: BLE001 - an old server without subject counts: do not wait
            stored = 0

        async def on_msg(msg) -> None:
            self.apply_message(msg.data)

        sub = await js.subscribe(CONTROL_SUBJECT, cb=on_msg, ordered_consumer=True,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        deadline = asyncio.get_running_loop().time() + catch_up_timeout_s
        while self.applied < stored and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        log.info("training_control_following", stored=stored, applied=self.applied)
        return sub
