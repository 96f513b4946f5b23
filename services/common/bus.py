"""JetStream plumbing: stream declarations and the one publish helper (D1, D3)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, NotFoundError

from contracts import subjects
from contracts.envelope import Envelope
from contracts.registry import encode
from services.common.logging import get_logger

log = get_logger(__name__)

# How long the server remembers a Nats-Msg-Id: a re-publish within this window is a duplicate.
# Longer than any retry loop of ours (max_deliver x ack_wait) so redelivered handlers re-publishing
# their deterministic ids are deduplicated by the bus, not only by the recorder.
DUPLICATE_WINDOW_S = 30 * 60


def stream_replicas() -> int:
    """How many copies of each stream and bucket JetStream keeps: TUNELINE_STREAM_REPLICAS, 1 by default; 3
    on the 3-node cluster (infra/nats/cluster.conf): an acknowledged write is then on a majority of nodes."""
    import os

    raw = os.environ.get("TUNELINE_STREAM_REPLICAS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"TUNELINE_STREAM_REPLICAS={raw!r} is not a number (1, 3 or 5)") from None
    if n not in (1, 3, 5):
        raise ValueError(f"TUNELINE_STREAM_REPLICAS={n}: JetStream replicas are 1, 3 or 5 (a majority must agree)")
    return n


def run_events_config() -> StreamConfig:
    return StreamConfig(
        name=subjects.STREAM,
        num_replicas=stream_replicas(),
        subjects=list(subjects.STREAM_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        # The bus is append-only too: no message deletes or purges through the API.
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


def dlq_config() -> StreamConfig:
    return StreamConfig(
        name=subjects.DLQ_STREAM,
        num_replicas=stream_replicas(),
        subjects=list(subjects.DLQ_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        allow_direct=True,
    )


def config_differs(wanted: StreamConfig, current: StreamConfig) -> list[str]:
    """The settings `wanted` sets that `current` (the server's) does not have."""
    have = current.as_dict()
    return sorted(k for k, v in wanted.as_dict().items() if have.get(k) != v)


async def declare_streams(js: JetStreamContext) -> None:
    """Create both streams, or update one whose settings differ; safe to run on every start.

    Only admin may update a stream (services/common/nats_auth.py): a service that finds one to change
    (an upgrade) says so and runs with the stream as it is until an admin declares it (`tuneline up` does)."""
    for cfg in (run_events_config(), dlq_config()):
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            await js.add_stream(cfg)
            log.info("stream_created", stream=cfg.name)
            continue
        differs = config_differs(cfg, info.config)
        if not differs:
            continue
        try:
            await js.update_stream(cfg)
        except TimeoutError:  # nats' TimeoutError subclasses the builtin; a refused request is never answered
            log.error("stream_update_refused", stream=cfg.name, settings=differs,
                      hint="not answered: this user may not update streams; `tuneline up` (admin) declares them")
        else:
            log.info("stream_updated", stream=cfg.name, settings=differs)


class PublishError(RuntimeError):
    pass


def headers_size(headers: dict[str, str]) -> int:
    """Bytes of the header block nats-py sends with `headers` ("NATS/1.0", a line per header, a blank line)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(k.encode()) + len(v.encode()) + len(b": \r\n")
                                            for k, v in headers.items())


def fits(js: JetStreamContext, data: bytes, headers: dict[str, str]) -> bool:
    """Whether the server takes a message of `data` with `headers`. nats-py checks the payload alone
    against max_payload; a message its headers take over the limit reaches the server, which closes
    the connection for it (and the service's subscriptions and publishes with it)."""
    return len(data) + headers_size(headers) <= js._nc.max_payload  # the context's connection


class ExpectedSequenceMismatch(PublishError):
    """Another writer appended to the subject first (nats error 10071)."""


async def publish(
    js: JetStreamContext,
    envelope: Envelope,
    subject: str,
    *,
    expected_last_subject_seq: int | None = None,
    expected_subject_filter: str | None = None,
    timeout: float = 10.0,
) -> PubAck:
    """Publish one envelope and wait for the PubAck.

    `Nats-Msg-Id` is the event id, so a re-publish (a redelivered handler, a retried call) is
    deduplicated by the server; a duplicate ack means the event is already stored: success.
    """
    headers = {"Nats-Msg-Id": str(envelope.event_id)}
    if expected_last_subject_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
        if expected_subject_filter:
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = expected_subject_filter
    data = encode(envelope)
    if not fits(js, data, headers):
        raise PublishError(f"{envelope.type} of {len(data)} bytes (with its headers) is over the server's "
                           f"max_payload of {js._nc.max_payload} bytes: not published to {subject}")
    try:
        ack = await js.publish(subject, data, timeout=timeout, headers=headers)
    except BadRequestError as exc:
        if exc.err_code == 10071:
            raise ExpectedSequenceMismatch(str(exc)) from exc
        raise PublishError(f"publish of {envelope.type} to {subject} refused: {exc}") from exc
    except (APIError, TimeoutError) as exc:  # nats' own TimeoutError subclasses the builtin
        raise PublishError(f"publish of {envelope.type} to {subject} failed: {exc!r}") from exc
    if ack.duplicate:
        log.info("publish_duplicate", subject=subject, published_event_id=str(envelope.event_id), seq=ack.seq)
    return ack
