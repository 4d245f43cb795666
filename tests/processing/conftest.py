"""Fixtures for the delivery layer: a Graph-compatible server, destinations, sources."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from processing.destinations import (
    LocalFolderDestination,
    MemoryCheckpointStore,
    OneDriveDestination,
    OneDriveSettings,
    StaticTokenProvider,
)
from processing.sources import FileSource
from tests.graph_server import DEFAULT_TOKEN, GraphTestServer
from tests.processing.support import TEST_FRAGMENT, SourceFile


@pytest.fixture
async def graph_server(tmp_path: Path) -> AsyncIterator[GraphTestServer]:
    """A Graph-compatible server on 127.0.0.1 (see tests/graph_server.py for its test API)."""
    async with GraphTestServer(storage_dir=tmp_path / "graph-store") as server:
        yield server


@pytest.fixture
def graph_settings(graph_server: GraphTestServer) -> OneDriveSettings:
    """Settings pointing at the test server, with 320 KiB fragments and millisecond backoff."""
    return OneDriveSettings(
        base_url=graph_server.base_url,
        fragment_size=TEST_FRAGMENT,
        backoff_initial=0.01,
        backoff_max=0.05,
        request_timeout=30.0,
    )


@pytest.fixture
async def make_onedrive(
    graph_settings: OneDriveSettings,
) -> AsyncIterator[Callable[..., OneDriveDestination]]:
    """Factory for OneDrive destinations (a new one = a restarted worker); all get closed.

    ``make(token=..., **settings_overrides)``.
    """
    created: list[OneDriveDestination] = []

    def make(*, token: str = DEFAULT_TOKEN, **overrides: Any) -> OneDriveDestination:
        settings = dataclasses.replace(graph_settings, **overrides)
        destination = OneDriveDestination(settings, StaticTokenProvider(token))
        created.append(destination)
        return destination

    yield make
    for destination in created:
        await destination.aclose()


@pytest.fixture
async def onedrive(graph_settings: OneDriveSettings) -> AsyncIterator[OneDriveDestination]:
    destination = OneDriveDestination(graph_settings, StaticTokenProvider(DEFAULT_TOKEN))
    yield destination
    await destination.aclose()


@pytest.fixture
def checkpoints() -> MemoryCheckpointStore:
    return MemoryCheckpointStore()


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    return tmp_path / "delivered"


@pytest.fixture
def local(local_root: Path) -> LocalFolderDestination:
    return LocalFolderDestination(local_root)


@pytest.fixture
def make_source(tmp_path: Path) -> Callable[..., SourceFile]:
    """Write ``size`` pseudo-random bytes (seeded) to a file and wrap it in a FileSource."""
    counter = iter(range(1_000_000))

    def make(size: int, *, seed: int | None = None, chunk_size: int = 256 * 1024) -> SourceFile:
        number = next(counter)
        data = random.Random(number if seed is None else seed).randbytes(size)
        path = tmp_path / "sources" / f"source-{number}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return SourceFile(
            FileSource(path, chunk_size=chunk_size), path, hashlib.sha256(data).hexdigest()
        )

    return make


@pytest.fixture(scope="module")
def moto_s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), for the S3 source tests; its URL.

    Named apart from the shared ``s3_server`` fixture of tests/conftest.py (the S3 store's)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
