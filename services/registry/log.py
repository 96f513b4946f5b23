"""A target's registry log on the bus (D7): its events read back in stream order and folded into the
aggregate's state; the sequence the next append must expect comes with it."""

from __future__ import annotations

from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.registry import ContractError, decode
from services.registry.domain import TargetState, fold


async def target_events(js, target: str, after: int = 0) -> list[tuple[int, dict | None]]:
    """(stream sequence, envelope dict with its payload upcast, or None for a message that is no valid
    event) of every message on the target's subjects after sequence `after`. Anyone may publish there:
    such a message is not folded, but it still counts for the expected sequence."""
    target_filter = subjects.registry_target_filter(target)
    out: list[tuple[int, dict | None]] = []
    seq = after + 1
    while True:
        try:
            msg = await js.get_msg(subjects.STREAM, seq, subject=target_filter, next=True, direct=True)
        except NotFoundError:
            return out
        try:
            env, payload = decode(msg.data)
        except ContractError:
            out.append((msg.seq, None))
        else:
            out.append((msg.seq, {**env.model_dump(mode="json"), "payload": payload.model_dump(mode="json")}))
        seq = msg.seq + 1


async def read_target(js, target: str) -> TargetState:
    """The target's state from its whole log; `last_sequence` is what the next append expects."""
    events = await target_events(js, target)
    return fold(target, [(seq, env or {"type": "", "payload": {}}) for seq, env in events])
