"""Fixtures of the scaled-mode tests: several `tusgate serve` processes sharing one NATS and one
S3 bucket, as in SPEC §2 "Scaled" (no sticky sessions: any instance serves any request).

* `deployment` -- one nats-server (``nats_server``) + the moto S3 server (``s3_bucket``);
  `deployment.gateways("a", "b")` starts gateway subprocesses (started side by side, each with
  its own data dir: its outbox is its own), `deployment.worker("w1")` a `tusgate process`.
* `cluster_deployment` -- the same on a three-node NATS cluster (``nats_cluster``), stream and
  KV buckets with three replicas.
* `TusClient` -- the few TUS requests the tests make, over aiohttp, against any instance.
* `stream_events` -- every event in the TUSGATE stream, read from outside.

Every gateway and worker is a real process (tests/helpers/gateway_proc.py), so `kill -9` is a
real crash. Processes are stopped (SIGTERM, then SIGKILL) when the test ends, and their logs are
printed then: pytest shows them for a failing test only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from events.bus import MSG_ID_HEADER, STREAM_NAME
from events.natsd import EmbeddedNats, NatsCluster
from tests.helpers.gateway_proc import (
    ServerProcess,
    gateway_argv,
    running_server,
    stop_process,
)

__all__ = [
    "OCTET",
    "PART",
    "TUS",
    "Deployment",
    "TusClient",
    "WorkerProcess",
    "metadata",
    "stream_events",
    "wait_for",
]

KiB = 1024
MiB = 1024 * KiB
#: The S3 part size of the gateways under test: the minimum, so that a few MiB cross parts.
PART = 5 * MiB

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}

WORKER_START_TIMEOUT = 30.0  # seconds until a worker logs that it consumes
LOG_TAIL = 4000  # characters of each process log printed when a test ends
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=90.0, sock_connect=5.0)
WORKER_READY = re.compile(r"processing worker \S+ consuming")


@dataclass(frozen=True)
class WorkerProcess:
    """A `tusgate process` subprocess and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Deployment:
    """Gateways and workers sharing one NATS (a server or a cluster) and one S3 bucket."""

    work_dir: Path
    nats_url: str  # one URL, or the comma-separated URLs of a cluster
    s3_endpoint: str
    bucket: str
    replicas: int = 1
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """TUSGATE_* of every process here; processing disabled unless `extra` enables it."""
        return {
            "TUSGATE_STORE_KIND": "s3",
            "TUSGATE_S3_BUCKET": self.bucket,
            "TUSGATE_S3_ENDPOINT_URL": self.s3_endpoint,
            "TUSGATE_S3_PART_SIZE": str(PART),
            "TUSGATE_NATS_URL": self.nats_url,
            "TUSGATE_NATS_REPLICAS": str(self.replicas),
            "TUSGATE_PROCESSING_ENABLED": "false",
            **extra,
        }

    def gateways(self, *names: str, **env: str) -> list[ServerProcess]:
        """Start one `tusgate serve` per name, side by side (start-up is mostly imports).

        The very first gateway of a deployment starts alone: it creates the stream, the KV
        buckets and the shared `status-projector` consumer. Two instances creating that
        consumer at the same moment can fail start-up with "consumer name already in use"
        (gateway/status_store.py does not retry; reported), which is not what these tests are
        about.
        """
        if not self.servers and len(names) > 1:
            self.gateways(names[0], **env)
            return [self.servers[names[0]], *self.gateways(*names[1:], **env)]
        managers = [
            running_server(self.work_dir / name, kind="gateway", env=self.env(**env))
            for name in names
        ]
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(m.__enter__) for m in managers]
            outcomes = [_outcome(f) for f in futures]
        for manager, (server, _) in zip(managers, outcomes, strict=True):
            if server is not None:
                self.stack.push(manager.__exit__)
        for name, (server, error) in zip(names, outcomes, strict=True):
            if error is not None:
                raise error
            assert server is not None
            self.servers[name] = server
        return [self.servers[name] for name in names]

    def worker(self, name: str, **env: str) -> WorkerProcess:
        """Start `tusgate process` and wait (bounded) until it consumes."""
        work_dir = self.work_dir / name
        work_dir.mkdir(parents=True, exist_ok=True)
        log_path = work_dir / "worker.log"
        tusgate = gateway_argv("127.0.0.1", 0, work_dir)[0]  # the installed console script
        argv = [tusgate, "process", "--data-dir", str(work_dir / "data")]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env(**env)},
                cwd=work_dir,
            )
        self.stack.callback(stop_process, process)
        worker = WorkerProcess(name, process, log_path)
        self.workers[name] = worker
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not WORKER_READY.search(worker.log()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{worker.log()}")
            time.sleep(0.05)
        return worker

    def print_logs(self) -> None:
        for name, server in self.servers.items():
            print(f"--- gateway {name} (pid {server.pid}) ---\n{server.log()[-LOG_TAIL:]}")
        for name, worker in self.workers.items():
            print(f"--- worker {name} (pid {worker.process.pid}) ---\n{worker.log()[-LOG_TAIL:]}")


def _outcome(future: Any) -> tuple[Any, BaseException | None]:
    try:
        return future.result(), None
    except BaseException as exc:  # noqa: BLE001 -- re-raised by the caller after clean-up
        return None, exc


@contextlib.contextmanager
def _deployment(
    work_dir: Path, nats_url: str, endpoint: str, bucket: str, replicas: int
) -> Iterator[Deployment]:
    deployment = Deployment(work_dir, nats_url, endpoint, bucket, replicas)
    with deployment.stack:
        try:
            yield deployment
        finally:
            deployment.print_logs()


@pytest.fixture
def deployment(
    tmp_path: Path, nats_server: EmbeddedNats, s3_server: str, s3_bucket: str
) -> Iterator[Deployment]:
    with _deployment(tmp_path, nats_server.url, s3_server, s3_bucket, 1) as d:
        yield d


@pytest.fixture
def cluster_deployment(
    tmp_path: Path, nats_cluster: NatsCluster, s3_server: str, s3_bucket: str
) -> Iterator[Deployment]:
    with _deployment(tmp_path, nats_cluster.url, s3_server, s3_bucket, 3) as d:
        yield d


# -- a small TUS client ------------------------------------------------------------------------


def metadata(**values: str) -> str:
    """An Upload-Metadata header value."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def offset(self) -> int:
        return int(self.headers["Upload-Offset"])


class TusClient:
    """TUS requests to any instance: `endpoint` is a gateway's ``http://…/files/``."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def create(self, endpoint: str, length: int, **headers: str) -> str:
        """POST; returns the upload id."""
        async with self.session.post(
            endpoint, headers={**TUS, "Upload-Length": str(length), **headers}
        ) as resp:
            assert resp.status == 201, f"POST: {resp.status} {await resp.text()}"
            return resp.headers["Location"].rstrip("/").rsplit("/", 1)[1]

    async def patch(
        self,
        endpoint: str,
        upload_id: str,
        offset: int,
        body: bytes | AsyncIterable[bytes],
        **headers: str,
    ) -> Reply:
        data: Any = body
        if isinstance(body, bytes):  # BytesIO: aiohttp warns about large raw bytes bodies
            data = io.BytesIO(body)
            headers.setdefault("Content-Length", str(len(body)))
        async with self.session.patch(
            endpoint + upload_id,
            data=data,
            headers={**OCTET, "Upload-Offset": str(offset), **headers},
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def head(self, endpoint: str, upload_id: str) -> Reply:
        async with self.session.head(endpoint + upload_id, headers=TUS) as resp:
            return Reply(resp.status, resp.headers, b"")

    async def offset(self, endpoint: str, upload_id: str) -> int:
        reply = await self.head(endpoint, upload_id)
        assert reply.status == 200, f"HEAD {upload_id}: {reply.status}"
        return reply.offset

    async def download(self, endpoint: str, upload_id: str) -> bytes:
        async with self.session.get(endpoint + upload_id) as resp:
            assert resp.status == 200, f"GET {upload_id}: {resp.status} {await resp.text()}"
            return await resp.read()

    async def sha256(self, endpoint: str, upload_id: str) -> str:
        return hashlib.sha256(await self.download(endpoint, upload_id)).hexdigest()

    async def status(self, endpoint: str, upload_id: str) -> dict[str, Any]:
        async with self.session.get(endpoint + upload_id + "/status") as resp:
            assert resp.status == 200, f"status {upload_id}: {resp.status} {await resp.text()}"
            result: dict[str, Any] = await resp.json()
            return result


@pytest.fixture
async def tus() -> AsyncIterator[TusClient]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        yield TusClient(session)


# -- the stream, from outside --------------------------------------------------------------------


async def stream_events(nats_url: str) -> list[tuple[str, dict[str, Any]]]:
    """(Nats-Msg-Id, envelope) of every message in the TUSGATE stream, in stream order."""
    nc = await nats.connect(
        servers=nats_url.split(","), connect_timeout=2, max_reconnect_attempts=3
    )
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM_NAME)
        out = []
        seq = info.state.first_seq
        while info.state.messages and seq <= info.state.last_seq:
            msg = await js.get_msg(STREAM_NAME, seq)
            assert msg.data is not None
            out.append(((msg.headers or {}).get(MSG_ID_HEADER, ""), json.loads(msg.data)))
            seq += 1
        return out
    finally:
        await nc.close()


async def wait_for(
    predicate: Any,
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "",
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll an async `predicate` until it returns something truthy (bounded). Exceptions in
    `retry_on` count as "not yet" (e.g. NATS errors while a cluster elects a leader)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await predicate()
        except retry_on:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(interval)
