"""Whole-system fixtures: what `tusgate up` runs, in one test.

* a real nats-server (``nats_url``, tests/conftest.py);
* the gateway app, ``create_app(settings)`` with ``nats_url`` set, on a real socket
  (``aiohttp_client``): outbox, outcome waiters, status projection;
* a processing worker (``run_process``) in the same event loop -- or, where a test must
  ``kill -9`` it, as a subprocess (``python -m processing.cli`` with TUSGATE_* settings);
* the Graph-compatible test server (tests/graph_server.py) as OneDrive, or the local folder.

``make_system(destination="onedrive" | "local", worker=True, **settings)`` builds one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from events.bus import EventBus
from gateway.app import create_app
from gateway.settings import FIELDS, Settings
from tests.graph_server import DEFAULT_TOKEN, GraphTestServer
from tests.processing.worker_support import (
    EventLog,
    RunningWorker,
    running_worker,
    test_settings,
    wait_until,
)

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Graph fragments in the tests: 320 KiB, the smallest allowed, so files have many.
TEST_FRAGMENT = 320 * 1024


def metadata(**values: str) -> str:
    """An Upload-Metadata header value."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class System:
    client: TestClient[Any, Any]
    settings: Settings
    log: EventLog
    bus: EventBus
    graph: GraphTestServer
    workers: list[RunningWorker] = field(default_factory=list)

    async def upload(
        self, data: bytes, *, prefer_async: bool = False, **meta: str
    ) -> tuple[str, Any]:
        """POST + one PATCH with all of `data` (a POST alone for an empty file); returns the
        upload's path and the completing response."""
        headers = {**TUS, "Upload-Length": str(len(data))}
        if meta:
            headers["Upload-Metadata"] = metadata(**meta)
        if prefer_async:
            headers["Prefer"] = "respond-async"
        if not data:
            response = await self.client.post("/files/", headers=headers)
            return "/files/" + response.headers["Location"].rsplit("/", 1)[1], response
        create = {k: v for k, v in headers.items() if k != "Prefer"}
        response = await self.client.post("/files/", headers=create)
        assert response.status == 201, await response.text()
        path = "/files/" + response.headers["Location"].rsplit("/", 1)[1]
        return path, await self.patch(path, data, prefer_async=prefer_async)

    async def patch(
        self, path: str, data: bytes, *, offset: int = 0, prefer_async: bool = False
    ) -> Any:
        headers = {**OCTET, "Upload-Offset": str(offset)}
        if prefer_async:
            headers["Prefer"] = "respond-async"
        return await self.client.patch(path, data=io.BytesIO(data), headers=headers)

    async def status(self, path: str) -> dict[str, Any]:
        response = await self.client.get(path + "/status")
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result

    async def wait_state(self, path: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(path)
            if status["state"] == state:
                return status
            assert time.monotonic() < deadline, f"{path} still {status['state']}: {status}"
            await asyncio.sleep(0.05)

    async def sse(self, path: str) -> list[dict[str, Any]]:
        """Every status of the progress stream, until it ends."""
        statuses = []
        async with self.client.session.get(
            self.client.make_url(path + "/progress"), timeout=None
        ) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for line in response.content:
                if line.startswith(b"data: "):
                    statuses.append(json.loads(line[6:]))
        return statuses

    def delivered_files(self) -> list[Path]:
        root = self.settings.delivered_dir
        return sorted(p for p in root.rglob("*") if p.is_file() and ".tusgate-part" not in p.name)


@pytest.fixture
async def graph(tmp_path: Path) -> AsyncIterator[GraphTestServer]:
    async with GraphTestServer(storage_dir=tmp_path / "graph") as server:
        yield server


MakeSystem = Callable[..., Awaitable[System]]


@pytest.fixture
async def make_system(
    nats_url: str, graph: GraphTestServer, aiohttp_client: Any, tmp_path: Path
) -> AsyncIterator[MakeSystem]:
    # nats_url first: the server is set up first and torn down last, after the gateway.
    stack = contextlib.AsyncExitStack()
    bus = EventBus(nats_url, name="e2e-observer")
    assert await bus.start(wait=5)
    log = EventLog()
    await bus.subscribe(["tusgate.processing.>", "tusgate.upload.bytes-received.v1"], log.on_event)

    async def make(
        destination: str = "onedrive", *, worker: bool = True, **overrides: Any
    ) -> System:
        settings = system_settings(tmp_path / "data", nats_url, graph, destination, **overrides)
        client = await aiohttp_client(create_app(settings))
        system = System(client, settings, log, bus, graph)
        if worker:
            system.workers.append(await stack.enter_async_context(running_worker(settings)))
        return system

    async with stack:
        yield make
    await bus.close()


def system_settings(
    data_dir: Path, nats_url: str, graph: GraphTestServer, destination: str, **overrides: Any
) -> Settings:
    base: dict[str, Any] = {"processing_wait": 30.0, "destination_kind": destination}
    if destination == "onedrive":
        base.update(
            graph_base_url=graph.base_url,
            graph_token=DEFAULT_TOKEN,
            graph_fragment_size=TEST_FRAGMENT,
        )
    return test_settings(data_dir, nats_url, **{**base, **overrides})


def settings_environment(settings: Settings) -> dict[str, str]:
    """TUSGATE_* variables that reproduce `settings` in another process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUSGATE_")}
    for f in FIELDS:
        value = getattr(settings, f.name)
        env[f.env] = str(value).lower() if f.type is bool else str(value)
    return env


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no cleanup, no ack, no lease release."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    """Start ``python -m processing.cli`` with the settings in its environment; wait until it
    says it consumes. Every one still running is killed at the end."""
    started: list[WorkerProcess] = []

    def spawn(settings: Settings) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "processing.cli"],
                cwd=REPO_ROOT,
                env=settings_environment(settings),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(process, log_path)
        started.append(worker)
        deadline = time.monotonic() + 30
        while "processing worker ready" not in worker.log():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{worker.log()}")
            time.sleep(0.05)
        return worker

    yield spawn
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


__all__ = [
    "OCTET",
    "TEST_FRAGMENT",
    "TUS",
    "MakeSystem",
    "System",
    "WorkerProcess",
    "metadata",
    "sha256",
    "wait_until",
]
