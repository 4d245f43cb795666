"""Run a real TUS server as a subprocess for the client tests.

The client tests (tests/js, tests/clients) talk to a server over a real socket, the way a user's
client does, so the server runs as its own process: ``tusgate serve`` on a free loopback port
with a temporary data directory and processing disabled.

``TUSGATE_TEST_SERVER=tus-node`` runs the same tests against @tus/server 2.x with
@tus/file-store instead (bench/tus_node_server.mjs, needs ``npm ci``). That reference mode
checks the tests themselves against a known-good server; it has no concatenation extension, so
the tests that need it skip there.

Start-up is bounded: the server's stdout goes to a log file that is polled for its start-up line
(``tusgate listening on http://HOST:PORT/files/``) until a deadline; a server that exits or stays
silent fails the fixture with its log attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "gateway_argv",
    "running_server",
    "server_kind",
    "sha256_of_download",
    "tus_request",
    "write_random_file",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO_ROOT / "node_modules"

DEFAULT_START_TIMEOUT = 30.0  # seconds for the start-up line to appear
DEFAULT_STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.05  # seconds

# "tusgate listening on http://127.0.0.1:1080/files/" (SPEC §7), and the reference server's
# "tus-node listening on …" from bench/tus_node_server.mjs.
READY_LINE = re.compile(r"(?:tusgate|tus-node) listening on (?P<url>http://\S+/files/)")

SERVER_KINDS = ("gateway", "tus-node")


class ServerStartError(RuntimeError):
    """The server exited or did not print its start-up line in time."""


@dataclass(frozen=True)
class ServerProcess:
    """A running server: its process, the TUS endpoint it printed, and where it stores data."""

    kind: str
    process: subprocess.Popen[bytes]
    endpoint: str  # absolute URL of the TUS endpoint, ending in "/files/"
    port: int
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown code runs."""
        self.process.kill()
        self.process.wait(DEFAULT_STOP_TIMEOUT)

    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def sha256_of_upload(self, url: str) -> tuple[str, int]:
        """(sha256 hex, size) of a finished upload's content, downloaded with ``GET url``.

        The reference server is read from its data dir instead: @tus/server 2.4.5's GET
        handler crashes the process on Node 20.20 ("ReadableStream is already closed").
        """
        if self.kind == "tus-node":
            return sha256_of_file(self.data_dir / url.rstrip("/").rsplit("/", 1)[-1])
        return sha256_of_download(url)


def server_kind() -> str:
    """Which server the client tests run against (``TUSGATE_TEST_SERVER``, default gateway)."""
    kind = os.environ.get("TUSGATE_TEST_SERVER", "gateway")
    if kind not in SERVER_KINDS:
        raise ValueError(f"TUSGATE_TEST_SERVER must be one of {SERVER_KINDS}, not {kind!r}")
    return kind


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def gateway_argv(host: str, port: int, data_dir: Path) -> list[str]:
    """The command line of ``tusgate serve`` from the interpreter's own environment."""
    script = Path(sys.executable).parent / "tusgate"
    exe = str(script) if script.exists() else shutil.which("tusgate")
    if exe is None:
        raise ServerStartError("the `tusgate` console script is not installed (pip install -e .)")
    return [exe, "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir)]


def tus_node_argv(host: str, port: int, data_dir: Path) -> list[str]:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@tus" / "server").is_dir():
        raise ServerStartError("the tus-node reference server needs node and `npm ci`")
    script = REPO_ROOT / "bench" / "tus_node_server.mjs"
    return [node, str(script), "--host", host, "--port", str(port), "--dir", str(data_dir)]


def _wait_for_ready(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        match = READY_LINE.search(log_path.read_text(errors="replace"))
        if match:
            return match.group("url")
        if process.poll() is not None:
            raise ServerStartError(
                f"server exited with {process.returncode} before it was ready:\n"
                + log_path.read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"no start-up line within {timeout:.0f}s:\n" + log_path.read_text(errors="replace")
            )
        time.sleep(POLL_INTERVAL)


def stop_process(process: subprocess.Popen[bytes], timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the process."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def running_server(
    work_dir: Path,
    *,
    kind: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> Iterator[ServerProcess]:
    """Start a server with its data under ``work_dir``; stop it on exit.

    Starting again with the same ``work_dir`` and ``port`` (after a crash) serves the same
    uploads at the same URLs. ``env`` adds to the inherited environment; processing is
    disabled unless it says otherwise, so a finished upload answers at once and nothing needs
    NATS or a destination.
    """
    kind = kind or server_kind()
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    starts = len(list(work_dir.glob(f"{kind}.*.log")))
    log_path = work_dir / f"{kind}.{starts}.log"  # one log per start: a restart keeps the first
    port = port or free_port(host)
    argv: Sequence[str] = (
        gateway_argv(host, port, data_dir)
        if kind == "gateway"
        else tus_node_argv(host, port, data_dir)
    )
    child_env = {**os.environ, "TUSGATE_PROCESSING_ENABLED": "false", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=work_dir,
        )
    try:
        endpoint = _wait_for_ready(process, log_path, start_timeout)
        yield ServerProcess(kind, process, endpoint, port, data_dir, log_path)
    finally:
        stop_process(process)


# --- content helpers shared by the client tests -------------------------------------------

HASH_BLOCK = 1 << 20


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        remaining = size
        while remaining:
            block = os.urandom(min(HASH_BLOCK, remaining))
            digest.update(block)
            out.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def sha256_of_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file."""
    digest = hashlib.sha256()
    count = 0
    with path.open("rb") as source:
        while block := source.read(HASH_BLOCK):
            digest.update(block)
            count += len(block)
    return digest.hexdigest(), count


def sha256_of_download(url: str, *, timeout: float = 60.0) -> tuple[str, int]:
    """GET ``url`` (a finished upload) and return (sha256 hex, byte count) of the body."""
    digest = hashlib.sha256()
    count = 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while block := response.read(HASH_BLOCK):
            digest.update(block)
            count += len(block)
    return digest.hexdigest(), count


def tus_request(
    method: str, url: str, headers: Mapping[str, str] | None = None, *, timeout: float = 30.0
) -> tuple[int, dict[str, str]]:
    """A bodiless TUS request (HEAD, OPTIONS, DELETE): (status, headers with lower-case names)."""
    request = urllib.request.Request(
        url, method=method, headers={"Tus-Resumable": "1.0.0", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}
