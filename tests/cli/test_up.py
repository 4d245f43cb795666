"""`tusgate up` on a fresh data dir, then the client commands, as the README says.

Real processes all the way: `tusgate up` (its own nats-server, gateway, one worker, local
destination), then `tusgate upload`, `tusgate status`, `tusgate events` as a user runs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

TUSGATE = str(Path(sys.executable).with_name("tusgate"))
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    def __init__(self, proc: subprocess.Popen[str], url: str, nats_url: str, data_dir: Path) -> None:
        self.proc, self.url, self.nats_url, self.data_dir = proc, url, nats_url, data_dir


@contextlib.contextmanager
def started_up(tmp_path: Path, **env: str) -> Iterator[Up]:
    """`tusgate up` on a fresh data dir (extra TUSGATE_* settings in `env`), until Ctrl-C."""
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [TUSGATE, "up", "--data-dir", str(data_dir), "--port", str(free_port()),
             "--nats-port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TUSGATE_PROCESSING_WAIT": "30", **env},
        )
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text()
        if "tusgate listening on" in text and "nats listening on" in text:
            break
        time.sleep(0.1)
    url = re.search(r"tusgate listening on (\S+)", text)
    nats_url = re.search(r"nats listening on (\S+)", text)
    assert url and nats_url, f"tusgate up did not start:\n{text}"
    try:
        yield Up(proc, url.group(1), nats_url.group(1), data_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    with started_up(tmp_path) as running:
        yield running


def client(
    *args: str, state: Path, timeout: float = 120, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUSGATE_CLIENT_STATE": str(state), **env_vars}
    return subprocess.run([TUSGATE, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def delivered_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "delivered").rglob("*") if p.is_file() and not p.name.endswith(".manifest.json")]


@pytest.mark.parametrize("respond_async", [False, True], ids=["wait", "async"])
def test_up_then_upload_status_events(up: Up, tmp_path: Path, respond_async: bool) -> None:
    source = tmp_path / "report.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    args = ["upload", str(source), "--url", up.url, "--chunk-size", str(1024 * 1024)]
    result = client(*args, *(["--async"] if respond_async else []), state=tmp_path / "state.json")
    assert result.returncode == 0, result.stderr
    upload_url = result.stdout.strip().splitlines()[0]
    upload_id = upload_url.rsplit("/", 1)[1]

    files = delivered_files(up.data_dir)
    assert len(files) == 1 and files[0].name == "report.bin"
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == digest

    for _ in range(100):  # the status projection follows the outcome within milliseconds
        status = client("status", upload_id, "--url", up.url, state=tmp_path / "state.json")
        assert status.returncode == 0, status.stderr
        if json.loads(status.stdout)["state"] == "succeeded":
            break
        time.sleep(0.1)
    body = json.loads(status.stdout)
    assert body["state"] == "succeeded" and body["result"]["sha256"] == digest

    events = client("events", "--nats-url", up.nats_url, state=tmp_path / "state.json", timeout=60)
    assert events.returncode == 0, events.stderr
    types = [json.loads(line)["type"] for line in events.stdout.splitlines() if line.strip()]
    for expected in ("tusgate.upload.created.v1", "tusgate.upload.bytes-received.v1",
                     "tusgate.processing.started.v1", "tusgate.processing.finished.v1"):
        assert expected in types
    assert types.index("tusgate.upload.created.v1") < types.index("tusgate.processing.finished.v1")


def test_upload_refused_by_a_check_exits_nonzero(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port, nats_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [TUSGATE, "up", "--data-dir", str(data_dir), "--port", str(port), "--nats-port", str(nats_port)],
            stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TUSGATE_CHECKS_MAX_SIZE": "1000"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "tusgate listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        source = tmp_path / "big.bin"
        source.write_bytes(os.urandom(5000))
        result = client("upload", str(source), "--url", f"http://127.0.0.1:{port}/files/", state=tmp_path / "s.json")
        assert result.returncode == 1
        assert "too_large" in result.stderr
        assert delivered_files(data_dir) == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_ctrl_c_stops_everything(up: Up) -> None:
    children = psutil.Process(up.proc.pid).children(recursive=True)
    assert any("nats-server" in " ".join(c.cmdline()) for c in children)
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[c.cmdline() for c in alive]}"


def test_up_with_jwt_and_a_token_from_the_environment(tmp_path: Path) -> None:
    """auth.kind jwt: the client commands send $TUSGATE_TOKEN; without it the upload is refused;
    the delivered file lands under the token's owner ({owner}/{date}/{filename})."""
    import jwt

    secret = "cli-test-secret-of-at-least-32-bytes"
    token = jwt.encode({"sub": "alice", "exp": time.time() + 600}, secret, algorithm="HS256")
    data = os.urandom(300_000)
    source = tmp_path / "report.bin"
    source.write_bytes(data)
    with started_up(tmp_path, TUSGATE_AUTH_KIND="jwt", TUSGATE_AUTH_JWT_SECRET=secret) as up:
        refused = client("upload", str(source), "--url", up.url, state=tmp_path / "s1.json")
        assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout
        done = client(
            "upload", str(source), "--url", up.url, state=tmp_path / "s2.json", TUSGATE_TOKEN=token
        )
        assert done.returncode == 0, done.stderr
        upload_id = done.stdout.split()[0].rsplit("/", 1)[1]
        status = client(
            "status", upload_id, "--url", up.url, state=tmp_path / "s2.json", TUSGATE_TOKEN=token
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["owner"] == "alice"
        [delivered] = delivered_files(up.data_dir)
        assert delivered.relative_to(up.data_dir / "delivered").parts[0] == "alice"
        assert delivered.read_bytes() == data
