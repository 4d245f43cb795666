"""tus-js-client (the reference browser/Node client) uploads to a real gateway process.

Each upload goes through tests/js/upload.mjs under Node; the content is then downloaded with
`GET /files/{id}` and compared by sha256, so every byte is checked end to end.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.gateway_proc import (
    ServerProcess,
    running_server,
    tus_request,
    write_random_file,
)

MiB = 1 << 20
FILE_SIZE = 20 * MiB
CHUNK_SIZE = 4 * MiB
UPLOAD_TIMEOUT = 120  # seconds for one whole upload by the Node client


@pytest.fixture(scope="module")
def random_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("content") / "random-20MiB.bin"
    return path, write_random_file(path, FILE_SIZE)


def node_upload(
    cmd: list[str],
    endpoint: str,
    path: Path,
    chunk: int,
    parallel: int = 1,
    *options: str,
) -> dict[str, Any]:
    """Run the Node client; return what it printed (url, sent, ended, resumed_from, ...)."""
    done = subprocess.run(
        [*cmd, endpoint, str(path), str(chunk), str(parallel), *options],
        capture_output=True,
        text=True,
        timeout=UPLOAD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"tus-js-client failed:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    assert isinstance(result["url"], str)
    return result


def test_chunked_upload_4mib(
    node_upload_cmd: list[str],
    gateway: ServerProcess,
    gateway_server: str,
    random_file: tuple[Path, str],
) -> None:
    path, expected = random_file

    url = node_upload(node_upload_cmd, gateway_server, path, CHUNK_SIZE)["url"]

    assert url.startswith(gateway_server)
    status, headers = tus_request("HEAD", url)
    assert status == 200
    assert headers["upload-offset"] == headers["upload-length"] == str(FILE_SIZE)
    assert gateway.sha256_of_upload(url) == (expected, FILE_SIZE)


def test_parallel_uploads_through_concatenation(
    node_upload_cmd: list[str],
    gateway: ServerProcess,
    gateway_server: str,
    random_file: tuple[Path, str],
) -> None:
    if gateway.kind == "tus-node":
        pytest.skip("@tus/file-store has no concatenation extension")
    path, expected = random_file

    url = node_upload(node_upload_cmd, gateway_server, path, CHUNK_SIZE, 3)["url"]

    # tus-js-client made three `Upload-Concat: partial` uploads and joined them with a final.
    status, headers = tus_request("HEAD", url)
    assert status == 200
    concat = headers.get("upload-concat", "")
    assert concat.startswith("final;"), f"not a final upload: Upload-Concat={concat!r}"
    assert len(concat.removeprefix("final;").split()) == 3
    assert headers["upload-length"] == str(FILE_SIZE)
    assert gateway.sha256_of_upload(url) == (expected, FILE_SIZE)


def test_resume_from_url_storage(
    node_upload_cmd: list[str],
    gateway: ServerProcess,
    random_file: tuple[Path, str],
    tmp_path: Path,
) -> None:
    path, expected = random_file
    storage = ["--url-storage", str(tmp_path / "tus-urls.json")]

    # The first run stops after two chunks; the URL stays in tus-js-client's FileUrlStorage.
    first = node_upload(
        node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, *storage,
        "--stop-after", str(2 * CHUNK_SIZE),
    )  # fmt: skip
    assert first["ended"] == "stopped"
    status, headers = tus_request("HEAD", first["url"])
    assert status == 200
    assert int(headers["upload-offset"]) == first["sent"] == 2 * CHUNK_SIZE

    # A new run finds it (findPreviousUploads), asks the server for the offset and goes on.
    second = node_upload(node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, *storage)
    assert second["ended"] == "success"
    assert second["url"] == first["url"]
    assert second["resumed_from"] >= 2 * CHUNK_SIZE  # not restarted from 0
    assert gateway.sha256_of_upload(second["url"]) == (expected, FILE_SIZE)


def test_creation_with_upload(
    node_upload_cmd: list[str], gateway: ServerProcess, random_file: tuple[Path, str]
) -> None:
    path, expected = random_file

    result = node_upload(
        node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, "--data-during-creation"
    )

    assert gateway.sha256_of_upload(result["url"]) == (expected, FILE_SIZE)


def test_deferred_length(
    node_upload_cmd: list[str], gateway: ServerProcess, tmp_path: Path
) -> None:
    # Not a multiple of the chunk size: tus-js-client 4.3.1 hangs after the last chunk when a
    # deferred-length stream ends exactly on a chunk boundary (tus/tus-js-client#779).
    size = 5 * MiB + 12345
    path = tmp_path / "odd-size.bin"
    expected = write_random_file(path, size)

    # A stream without a path: tus-js-client creates with Upload-Defer-Length: 1 and declares
    # Upload-Length with the last PATCH.
    result = node_upload(node_upload_cmd, gateway.endpoint, path, MiB, 1, "--defer-length")

    status, headers = tus_request("HEAD", result["url"])
    assert status == 200
    assert headers["upload-length"] == headers["upload-offset"] == str(size)
    assert gateway.sha256_of_upload(result["url"]) == (expected, size)


def test_termination(
    node_upload_cmd: list[str], gateway: ServerProcess, random_file: tuple[Path, str]
) -> None:
    path, _ = random_file

    # abort(true) stops the upload and DELETEs it (the termination extension).
    result = node_upload(
        node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, "--terminate-after", "1"
    )

    assert result["ended"] == "terminated"
    status, _ = tus_request("HEAD", result["url"])
    assert status in (404, 410)


def test_upload_survives_a_server_crash(
    node_upload_cmd: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Its own server: this one is killed with SIGKILL half-way and started again on the same
    # port and data dir. tus-js-client, allowed to retry, asks for the offset (HEAD) once the
    # server is back and finishes the same upload.
    size, chunk = 128 * MiB, MiB
    work_dir = tmp_path_factory.mktemp("crash")
    path = work_dir / "random-128MiB.bin"
    expected = write_random_file(path, size)

    with running_server(work_dir) as first:
        argv = [*node_upload_cmd, first.endpoint, str(path), str(chunk), "1", "--retries", "50"]
        client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + UPLOAD_TIMEOUT
            while stored_bytes(first.data_dir) < 16 * MiB and time.monotonic() < deadline:
                if client.poll() is not None:
                    pytest.fail(f"the upload ended before the crash:\n{client.communicate()}")
                time.sleep(0.01)
            first.kill()
            with running_server(work_dir, port=first.port) as second:
                stdout, stderr = client.communicate(timeout=UPLOAD_TIMEOUT)
                assert client.returncode == 0, f"tus-js-client failed:\n{stderr}"
                result = json.loads(stdout)
                assert result["retries"] >= 1, "the client never saw the crash"
                assert second.sha256_of_upload(result["url"]) == (expected, size)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()


def stored_bytes(data_dir: Path) -> int:
    total = 0
    for f in data_dir.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


@pytest.mark.parametrize("protocol", ["ietf-draft-03", "ietf-draft-05"])
def test_the_ietf_draft_protocols_of_tus_js_client(
    node_upload_cmd: list[str],
    gateway: ServerProcess,
    random_file: tuple[Path, str],
    tmp_path: Path,
    protocol: str,
) -> None:
    """tus-js-client speaking the IETF "Resumable Uploads for HTTP" draft (interop versions 5
    and 6) to the same endpoint: a chunked upload stopped halfway, resumed from its stored URL
    (HEAD), finished; then the bytes are checked."""
    if gateway.kind == "tus-node":
        pytest.skip("the draft is not served by this @tus/server set-up")
    path, expected = random_file
    storage = ["--url-storage", str(tmp_path / "draft-urls.json"), "--protocol", protocol]
    first = node_upload(
        node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, *storage,
        "--stop-after", str(2 * CHUNK_SIZE),
    )
    assert first["ended"] == "stopped"
    second = node_upload(node_upload_cmd, gateway.endpoint, path, CHUNK_SIZE, 1, *storage)
    assert second["ended"] == "success" and second["url"] == first["url"]
    assert second["resumed_from"] == 2 * CHUNK_SIZE
    assert gateway.sha256_of_upload(second["url"]) == (expected, FILE_SIZE)
