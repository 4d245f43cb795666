"""The embedded nats-server: start, readiness, restart on the same port and store, cluster."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import nats
import pytest

from events.bus import STREAM_NAME, ensure_stream
from events.errors import NatsServerError
from events.natsd import EmbeddedNats, NatsCluster, find_nats_server


def test_binary_is_found_next_to_python() -> None:
    assert Path(find_nats_server()).name == "nats-server"


def test_start_picks_a_free_port_and_stops(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path)
    started = time.monotonic()
    server.start()
    try:
        assert time.monotonic() - started < 5
        assert server.url.startswith("nats://127.0.0.1:")
        assert server.is_running
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
            assert sock.recv(5) == b"INFO "
        assert (tmp_path / "nats").is_dir()
    finally:
        server.stop()
    assert not server.is_running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


async def test_async_context_and_jetstream_state_survives_restart(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path)
    async with server:
        port = server.port
        nc = await nats.connect(server.url)
        await ensure_stream(nc.jetstream())
        await nc.jetstream().publish("tusgate.test.v1", b"{}")
        await nc.close()
    async with server:
        assert server.port == port  # same port after a restart
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info(STREAM_NAME)
        assert info.state.messages == 1  # and the same store
        await nc.close()
    assert (tmp_path / "nats" / "jetstream").is_dir()


def test_fixed_port_in_use_fails_fast_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedNats(tmp_path, port=busy.getsockname()[1], startup_timeout=5)
        with pytest.raises(NatsServerError, match="address already in use"):
            server.start()
    assert not server.is_running


def test_kill_then_start_again(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path) as server:
        pid = server.pid
        server.kill()
        assert not server.is_running
        server.start()
        assert server.pid != pid and server.is_running


def test_monitoring_port(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path, monitor_port=0) as server:
        assert server.monitor_url is not None and server.monitor_url.startswith("http://127.0.0.1:")


async def test_three_node_cluster_takes_a_replicated_stream(tmp_path: Path) -> None:
    async with NatsCluster(tmp_path) as cluster:
        assert len(cluster.urls) == 3
        nc = await nats.connect(cluster.urls)
        try:
            info = await ensure_stream(nc.jetstream(timeout=10), replicas=3)
            assert info.config.num_replicas == 3
            ack = await nc.jetstream().publish("tusgate.test.v1", b"{}")
            assert ack.seq == 1
        finally:
            await nc.close()


def test_nats_cluster_fixture(nats_cluster: NatsCluster) -> None:
    assert all(node.is_running for node in nats_cluster.nodes)
    assert nats_cluster.url.count("nats://") == 3
