"""The recorder's puller (services/audit/pull.py) against a real nats-server: batches in stream order,
status messages ending a round, a waiting request answered by a later publish, ack-all."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from contracts import subjects
from services.audit.pull import RawBatchPuller
from services.audit.recorder import stream_sequence
from tests.conftest import wait_for

pytestmark = pytest.mark.connected

SUBJECT = f"{subjects.EVENTS}.ingest.committed"


async def _puller(js, nats_server, *, batch, wait_s=0.5) -> RawBatchPuller:
    await js.add_consumer(subjects.STREAM, ConsumerConfig(durable_name="pull-test", ack_policy=AckPolicy.ALL,
                                                          filter_subject=f"{subjects.ROOT}.>", ack_wait=30))
    puller = RawBatchPuller(nats_server.url, subjects.STREAM, "pull-test", batch=batch, wait_s=wait_s)
    await puller.start()
    return puller


async def test_batches_come_in_stream_order_up_to_the_batch_size_then_empty(js, nats_server):
    for i in range(5):
        await js.publish(SUBJECT, f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"})
    puller = await _puller(js, nats_server, batch=3)
    try:
        first, second, third = await puller.next_batch(), await puller.next_batch(), await puller.next_batch()
    finally:
        await puller.stop()
    assert [m.data for m in first] == [b"m0", b"m1", b"m2"]
    assert [m.data for m in second] == [b"m3", b"m4"]
    assert third == []  # nothing left: the waiting request expires (a status message, not a message)
    assert [stream_sequence(m) for m in first + second] == [1, 2, 3, 4, 5]
    assert {m.subject for m in first + second} == {SUBJECT}
    assert first[0].headers is None  # not parsed: the recorder does not read them


async def test_a_waiting_request_is_answered_by_a_message_published_later(js, nats_server):
    puller = await _puller(js, nats_server, batch=10, wait_s=5.0)
    try:
        waiting = asyncio.create_task(puller.next_batch())
        await asyncio.sleep(0.2)
        await js.publish(SUBJECT, b"late", headers={"Nats-Msg-Id": "late"})
        got = await waiting
    finally:
        await puller.stop()
    assert [m.data for m in got] == [b"late"]


async def test_acking_the_last_message_of_a_batch_settles_the_batch(js, nats_server):
    for i in range(4):
        await js.publish(SUBJECT, f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"})
    puller = await _puller(js, nats_server, batch=4)

    async def settled():
        info = await js.consumer_info(subjects.STREAM, "pull-test")
        return (info.ack_floor.stream_seq, info.num_ack_pending) == (4, 0)

    try:
        batch = await puller.next_batch()
        assert not await settled()
        await batch[-1].ack()
        await wait_for(settled)  # the server applies an ack asynchronously
    finally:
        await puller.stop()


async def test_a_subject_that_is_not_utf8_is_handed_out_and_the_puller_goes_on(js, nats_server):
    """Subjects are bytes: decoding one that is not UTF-8 raised in nats-py's read loop, which ended, and
    the recorder pulled nothing more (lag growing for good)."""
    import socket

    host, port = nats_server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as raw:  # nats-py itself refuses to publish one
        raw.recv(4096)
        raw.sendall(b'CONNECT {"verbose":false}\r\nPUB ' + SUBJECT.encode() + b".\xff\xfe 2\r\n{}\r\nPING\r\n")
        assert b"PONG" in raw.recv(4096)
    await js.publish(SUBJECT, b"after", headers={"Nats-Msg-Id": "after"})
    puller = await _puller(js, nats_server, batch=10, wait_s=1.0)
    try:
        got = await puller.next_batch()
        got += await puller.next_batch() if len(got) < 2 else []
    finally:
        await puller.stop()
    assert [(m.subject, m.data) for m in got] == [(SUBJECT + ".\ufffd\ufffd", b"{}"), (SUBJECT, b"after")]
