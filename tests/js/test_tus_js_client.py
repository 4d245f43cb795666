"""tus-js-client (the reference browser/Node client) uploads to a real gateway process.

Each upload goes through tests/js/upload.mjs under Node; the content is then downloaded with
`GET /files/{id}` and compared by sha256, so every byte is checked end to end.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.gateway_proc import (
    ServerProcess,
    sha256_of_download,
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


def node_upload(cmd: list[str], endpoint: str, path: Path, chunk: int, parallel: int) -> str:
    """Run the Node client; return the final upload URL it printed."""
    done = subprocess.run(
        [*cmd, endpoint, str(path), str(chunk), str(parallel)],
        capture_output=True,
        text=True,
        timeout=UPLOAD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"tus-js-client failed:\n{done.stderr}"
    url = json.loads(done.stdout)["url"]
    assert isinstance(url, str)
    return url


def test_chunked_upload_4mib(
    node_upload_cmd: list[str], gateway_server: str, random_file: tuple[Path, str]
) -> None:
    path, expected = random_file

    url = node_upload(node_upload_cmd, gateway_server, path, CHUNK_SIZE, parallel=1)

    assert url.startswith(gateway_server)
    status, headers = tus_request("HEAD", url)
    assert status == 200
    assert headers["upload-offset"] == headers["upload-length"] == str(FILE_SIZE)
    assert sha256_of_download(url) == (expected, FILE_SIZE)


def test_parallel_uploads_through_concatenation(
    node_upload_cmd: list[str],
    gateway: ServerProcess,
    gateway_server: str,
    random_file: tuple[Path, str],
) -> None:
    if gateway.kind == "tus-node":
        pytest.skip("@tus/file-store has no concatenation extension")
    path, expected = random_file

    url = node_upload(node_upload_cmd, gateway_server, path, CHUNK_SIZE, parallel=3)

    # tus-js-client made three `Upload-Concat: partial` uploads and joined them with a final.
    status, headers = tus_request("HEAD", url)
    assert status == 200
    concat = headers.get("upload-concat", "")
    assert concat.startswith("final;"), f"not a final upload: Upload-Concat={concat!r}"
    assert len(concat.removeprefix("final;").split()) == 3
    assert headers["upload-length"] == str(FILE_SIZE)
    assert sha256_of_download(url) == (expected, FILE_SIZE)
