"""tuspy (``tusclient``, the Python client) uploads to a real gateway process.

tuspy is synchronous (requests), so these are plain sync tests. Content is verified end to end:
the upload is downloaded with ``GET /files/{id}`` and compared by sha256.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tusclient.client import TusClient
from tusclient.storage.filestorage import FileStorage
from tusclient.uploader.uploader import Uploader

from tests.helpers.gateway_proc import (
    ServerProcess,
    tus_request,
    write_random_file,
)

MiB = 1 << 20
FILE_SIZE = 5 * MiB
CHUNK_SIZE = 1 * MiB
KILLED_CLIENT = Path(__file__).with_name("tuspy_killed_client.py")


class _StaysOpen(io.BufferedReader):
    """A file for tuspy's ``file_stream`` that survives tuspy's own ``with`` block.

    Given ``file_path``, tuspy 1.1 opens the file again for every chunk and never closes it
    (ResourceWarnings, errors under ``filterwarnings = error``); given ``file_stream``, it
    closes that stream after fingerprinting it for ``store_url``. So the tests pass a stream
    whose ``__exit__`` leaves it open, and close it themselves.
    """

    def __exit__(self, *exc_info: object) -> None:
        return None


@contextlib.contextmanager
def stream_of(path: Path) -> Iterator[io.BufferedReader]:
    stream = _StaysOpen(io.FileIO(path, "rb"))
    try:
        yield stream
    finally:
        stream.close()


@contextlib.contextmanager
def url_storage(path: Path) -> Iterator[FileStorage]:
    """tuspy's file-backed URL storage (tinydb), closed afterwards."""
    storage = FileStorage(str(path))  # type: ignore[no-untyped-call]
    try:
        yield storage
    finally:
        storage.close()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def random_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("content") / "random-5MiB.bin"
    return path, write_random_file(path, FILE_SIZE)


def url_of(uploader: Uploader) -> str:
    """The upload URL of an uploader that has created (or found) its upload."""
    assert uploader.url is not None
    return uploader.url


def head_offset(url: str) -> int:
    status, headers = tus_request("HEAD", url)
    assert status == 200, f"HEAD {url} -> {status}"
    return int(headers["upload-offset"])


def test_chunked_upload(gateway: ServerProcess, random_file: tuple[Path, str]) -> None:
    path, expected = random_file
    with stream_of(path) as stream:
        uploader = TusClient(gateway.endpoint).uploader(
            file_stream=stream, chunk_size=CHUNK_SIZE, metadata={"filename": path.name}
        )
        uploader.upload()

    assert uploader.offset == FILE_SIZE
    assert head_offset(url_of(uploader)) == FILE_SIZE
    assert gateway.sha256_of_upload(url_of(uploader)) == (expected, FILE_SIZE)


def test_upload_without_metadata(gateway: ServerProcess, random_file: tuple[Path, str]) -> None:
    # Without metadata tuspy still sends the header, empty: `Upload-Metadata: ` on the POST.
    if gateway.kind == "tus-node":
        pytest.skip("@tus/server 2.x answers an empty Upload-Metadata with 400")
    path, expected = random_file
    with stream_of(path) as stream:
        uploader = TusClient(gateway.endpoint).uploader(file_stream=stream, chunk_size=CHUNK_SIZE)
        uploader.upload()

    assert gateway.sha256_of_upload(url_of(uploader)) == (expected, FILE_SIZE)


def test_chunks_with_checksums(gateway: ServerProcess, random_file: tuple[Path, str]) -> None:
    # upload_checksum=True: every PATCH carries `Upload-Checksum: sha1 <base64>` (checksum
    # extension); a mismatch would be a 460 and tuspy would raise.
    path, expected = random_file
    with stream_of(path) as stream:
        uploader = TusClient(gateway.endpoint).uploader(
            file_stream=stream,
            chunk_size=CHUNK_SIZE,
            metadata={"filename": path.name},
            upload_checksum=True,
        )
        uploader.upload()

    assert gateway.sha256_of_upload(url_of(uploader)) == (expected, FILE_SIZE)


def test_resume_from_stored_url(
    gateway: ServerProcess, random_file: tuple[Path, str], tmp_path: Path
) -> None:
    path, expected = random_file
    client = TusClient(gateway.endpoint)
    metadata = {"filename": path.name}
    with url_storage(tmp_path / "tus-urls.json") as storage, stream_of(path) as stream:
        first = client.uploader(
            file_stream=stream,
            chunk_size=CHUNK_SIZE,
            metadata=metadata,
            store_url=True,
            url_storage=storage,
        )
        for _ in range(2):
            first.upload_chunk()  # type: ignore[no-untyped-call]
        stored_url = url_of(first)
        del first  # the application stops here, its upload URL kept in the storage

    with url_storage(tmp_path / "tus-urls.json") as storage, stream_of(path) as stream:
        resumed = client.uploader(
            file_stream=stream,
            chunk_size=CHUNK_SIZE,
            metadata=metadata,
            store_url=True,
            url_storage=storage,
        )
        # The new uploader found the URL in its storage and asked the server (HEAD) for the
        # offset: it goes on at 2 MiB instead of starting a new upload from 0.
        assert resumed.url == stored_url
        assert resumed.offset == head_offset(stored_url) == 2 * CHUNK_SIZE
        resumed.upload()

    assert resumed.offset == FILE_SIZE
    assert gateway.sha256_of_upload(stored_url) == (expected, FILE_SIZE)


def test_resume_after_client_killed_mid_patch(
    gateway: ServerProcess, random_file: tuple[Path, str], tmp_path: Path
) -> None:
    path, expected = random_file
    storage_path = tmp_path / "tus-urls.json"
    argv = [sys.executable, str(KILLED_CLIENT), gateway.endpoint, str(path), str(storage_path)]
    killed = subprocess.Popen(
        [*argv, str(CHUNK_SIZE), "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None
        line = killed.stdout.readline()  # printed once half a PATCH body is sent
        time.sleep(0.2)  # let the half body reach the server before the connection drops
    finally:
        killed.send_signal(signal.SIGKILL)
        _, stderr = killed.communicate(timeout=10)
    assert line, f"the tuspy client failed before the cut:\n{stderr}"
    cut = json.loads(line)
    assert cut["sent"] == 2 * CHUNK_SIZE + CHUNK_SIZE // 2

    # "When a client disconnects mid-PATCH, the bytes that arrived are kept and the offset says
    # so" (SPEC §3.1): the offset reaches what was sent once the server has seen the drop.
    deadline = time.monotonic() + 10
    while (offset := head_offset(cut["url"])) < cut["sent"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert offset == cut["sent"]

    with url_storage(storage_path) as storage, stream_of(path) as stream:
        resumed = TusClient(gateway.endpoint).uploader(
            file_stream=stream, chunk_size=CHUNK_SIZE, store_url=True, url_storage=storage
        )
        assert resumed.url == cut["url"]
        assert resumed.offset == offset
        resumed.upload()

    assert gateway.sha256_of_upload(cut["url"]) == (expected, FILE_SIZE)


def test_metadata_is_echoed(gateway: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    expected = write_random_file(path, 1000)
    # An empty value is sent as "note " (key, space, no base64). It goes first: trailing
    # whitespace of a header value is not part of it in HTTP, so at the end it would be lost.
    metadata = {"note": "", "filename": "résumé 2024.pdf", "filetype": "application/pdf"}
    with stream_of(path) as stream:
        uploader = TusClient(gateway.endpoint).uploader(
            file_stream=stream, chunk_size=CHUNK_SIZE, metadata=metadata
        )
        # "note ,filename cnM…,filetype YXB…"
        sent = ",".join(uploader.encode_metadata())  # type: ignore[no-untyped-call]
        uploader.upload()

    status, headers = tus_request("HEAD", url_of(uploader))
    assert status == 200
    assert decode_metadata(headers["upload-metadata"]) == metadata
    if gateway.kind == "gateway":
        # "Upload-Metadata echoed exactly as received" (SPEC §3.1); @tus/server re-encodes it.
        assert headers["upload-metadata"] == sent
    assert gateway.sha256_of_upload(url_of(uploader)) == (expected, 1000)


def decode_metadata(header: str) -> dict[str, str]:
    pairs = (item.strip().partition(" ") for item in header.split(","))
    return {key: base64.b64decode(value).decode() for key, _, value in pairs}
