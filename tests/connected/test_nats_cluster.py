"""infra/nats/cluster.conf: three nats-servers from the real binary form one JetStream cluster; with
TUNELINE_STREAM_REPLICAS=3 the streams are R3, a write acknowledged on one node is read on another, and the
stream keeps taking writes with a node down (a majority is left). The per-service users hold there too."""

from __future__ import annotations

import os
import re
import subprocess

import nats
import pytest

from contracts import subjects
from contracts.events import PrepPrepared
from services.cli.stack import REPO_ROOT, _wait_for_port, free_port, nats_server_binary, stop_pid
from services.common.bus import declare_streams, publish, run_events_config, stream_replicas
from services.common.nats_auth import connect_options, new_passwords, server_env
from tests.conftest import wait_for
from tests.factories import envelope, plan, ref

pytestmark = pytest.mark.connected

CLUSTER_CONF = REPO_ROOT / "infra" / "nats" / "cluster.conf"


@pytest.fixture
def cluster(tmp_path):
    passwords = new_passwords()
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = "[" + ", ".join(f"nats-route://127.0.0.1:{route}" for _, route in ports) + "]"
    nodes = []
    try:
        for i, (client, route) in enumerate(ports, 1):
            log = tmp_path / f"n{i}.log"
            env = dict(os.environ, TUNELINE_NATS_LISTEN=f"127.0.0.1:{client}", TUNELINE_NATS_SERVER_NAME=f"n{i}",
                       TUNELINE_NATS_STORE_DIR=str(tmp_path / f"n{i}"), TUNELINE_NATS_CLUSTER_LISTEN=f"127.0.0.1:{route}",
                       TUNELINE_NATS_ROUTES=routes, **server_env(passwords))
            with open(log, "ab") as out:
                popen = subprocess.Popen([str(nats_server_binary()), "-c", str(CLUSTER_CONF)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
            nodes.append((f"nats://127.0.0.1:{client}", popen, log))
        for url, popen, log in nodes:
            _wait_for_port("127.0.0.1", int(url.rsplit(":", 1)[1]), popen, log)
        yield nodes, passwords
    finally:
        for _, popen, _ in nodes:
            stop_pid(popen.pid)
            popen.wait(timeout=15)


def test_cluster_conf_is_the_server_conf_plus_a_cluster_block_with_fsync_on_every_write():
    text = CLUSTER_CONF.read_text()
    assert 'include "nats-server-auth.conf"' in text
    assert re.search(r"cluster\s*\{[^}]*routes:\s*\$TUNELINE_NATS_ROUTES", text, re.S)
    base = (REPO_ROOT / "infra" / "nats" / "nats-server.conf").read_text()
    assert re.search(r"^\s*sync_interval\s*:\s*always\s*$", base, re.M)


def test_stream_replicas_setting(monkeypatch):
    monkeypatch.delenv("TUNELINE_STREAM_REPLICAS", raising=False)
    assert stream_replicas() == 1 and run_events_config().num_replicas == 1
    monkeypatch.setenv("TUNELINE_STREAM_REPLICAS", "3")
    assert run_events_config().num_replicas == 3
    for bad, says in (("2", "1, 3 or 5"), ("three", "not a number")):
        monkeypatch.setenv("TUNELINE_STREAM_REPLICAS", bad)
        with pytest.raises(ValueError, match=says):
            stream_replicas()


def prepared(run_id: str):
    return envelope(PrepPrepared(plan=plan(), manifest=ref(run_id), train=ref("t"), eval=ref("e"), label_space=["a", "b"],
                                 train_rows=8, eval_rows=2, dataset_version=run_id), run_id=run_id, producer="prep")


async def _connect(url: str, user: str, passwords: dict) -> nats.NATS:
    async def quiet(_exc):
        pass

    return await nats.connect(url, error_cb=quiet, **connect_options(user, passwords[user]))


async def test_three_nodes_hold_r3_streams_that_survive_a_node_down(cluster, monkeypatch):
    nodes, passwords = cluster
    monkeypatch.setenv("TUNELINE_STREAM_REPLICAS", "3")
    admin = await _connect(nodes[0][0], "admin", passwords)
    try:
        js = admin.jetstream()

        async def meta_ready():
            try:
                await js.account_info()
                return True
            except Exception:  # noqa: BLE001 - no meta leader yet
                return False

        await wait_for(meta_ready, timeout=30, interval=0.3)
        await declare_streams(js)
        info = await js.stream_info(subjects.STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        assert {info.cluster.leader, *(r.name for r in info.cluster.replicas)} == {"n1", "n2", "n3"}
    finally:
        await admin.close()

    # prep publishes its own event through node 2; node 3 has it
    event = prepared("run-r3")
    prep = await _connect(nodes[1][0], "prep", passwords)
    try:
        ack = await publish(prep.jetstream(), event, subjects.subject_for(event.type, kind="event"))
    finally:
        await prep.close()
    reader = await _connect(nodes[2][0], "cli", passwords)
    try:
        msg = await reader.jetstream().get_msg(subjects.STREAM, ack.seq)
        assert msg.headers.get("Nats-Msg-Id") == str(event.event_id)
    finally:
        await reader.close()

    # one node down: two of three still form a majority, writes are acknowledged
    stop_pid(nodes[2][1].pid)
    prep = await _connect(nodes[0][0], "prep", passwords)
    try:
        second = prepared("run-r3b")

        async def accepted():
            try:
                return await publish(prep.jetstream(), second, subjects.subject_for(second.type, kind="event"),
                                     timeout=3.0)
            except Exception:  # noqa: BLE001 - a new leader is being elected
                return None

        later = await wait_for(accepted, timeout=30, interval=0.5)
        assert later.seq > ack.seq
    finally:
        await prep.close()
