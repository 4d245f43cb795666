"""`kill -9` of a real gateway process at the worst moments, then a restart on the same data dir.

The filesystem store promises (gateway/store/filestore.py): the offset is the size of `<id>.bin`,
so after a crash it is exactly what reached the disk; the info is replaced atomically, so it is
never unreadable; a checksummed chunk that was not verified does not count.

Each test runs `tusgate serve` as a subprocess (tests/helpers/gateway_proc.py), SIGKILLs it while
a request is in flight, starts it again on the same data dir and checks what HEAD says against
what is on disk, then finishes the upload and compares sha256 of `GET` with the source.

Kill points are chosen by a seeded RNG; the kill happens once the server has put at least
`kill_at` bytes on disk (polled, bounded), so it always lands mid-body with bytes in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.gateway_proc import ServerProcess, running_server

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}

MiB = 1024 * 1024
SIZE = 32 * MiB
BLOCK = 64 * 1024
POLL = 0.01  # seconds between looks at the disk
POLL_ROUNDS = 3000  # bounded: 30 s at most before a wait gives up (and the test fails)
METADATA = "filename Y3Jhc2guYmlu,filetype YXBwbGljYXRpb24vb2N0ZXQtc3RyZWFt,empty"


@contextlib.contextmanager
def gateway(work_dir: Path) -> Iterator[ServerProcess]:
    """`tusgate serve` on the data dir `work_dir/data` (the same dir on every restart)."""
    with running_server(work_dir, kind="gateway") as server:
        try:
            yield server
        except BaseException:
            print(f"--- gateway log ---\n{server.log()}")
            raise


def sigkill(server: ServerProcess) -> None:
    server.process.kill()  # SIGKILL: no handler, no cleanup, no flush
    assert server.process.wait(timeout=30) == -signal.SIGKILL


def uploads_dir(work_dir: Path) -> Path:
    return work_dir / "data" / "uploads"


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def bin_size(work_dir: Path, uid: str) -> int:
    path = uploads_dir(work_dir) / f"{uid}.bin"
    return path.stat().st_size if path.exists() else -1


async def wait_on_disk(work_dir: Path, uid: str, at_least: int, *, pending: bool = False) -> int:
    """Until the server has written `at_least` bytes of the upload (and, with `pending`, while the
    checksummed chunk's marker is there); returns the size seen. Bounded."""
    marker = uploads_dir(work_dir) / f"{uid}.pending"
    size = -1
    for _ in range(POLL_ROUNDS):
        size = bin_size(work_dir, uid)
        if size >= at_least and (not pending or marker.exists()):
            return size
        await asyncio.sleep(POLL)
    raise AssertionError(f"the server wrote only {size} of {at_least} bytes")


async def create(session: aiohttp.ClientSession, endpoint: str, size: int, **headers: str) -> str:
    async with session.post(
        endpoint, headers={**TUS, "Upload-Length": str(size), **headers}
    ) as resp:
        assert resp.status == 201, await resp.text()
        return resp.headers["Location"]


async def head(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with session.head(url, headers=TUS) as resp:
        assert resp.status == 200, resp.status
        return dict(resp.headers)


async def patch(
    session: aiohttp.ClientSession, url: str, offset: int, body: bytes, **headers: str
) -> int:
    """A whole PATCH at normal speed; returns the new offset."""

    async def blocks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), MiB):
            yield body[i : i + MiB]

    async with session.patch(
        url,
        data=blocks(),
        headers={
            **OCTET,
            "Upload-Offset": str(offset),
            "Content-Length": str(len(body)),
            **headers,
        },
    ) as resp:
        assert resp.status == 204, await resp.text()
        return int(resp.headers["Upload-Offset"])


async def sha256_of_get(session: aiohttp.ClientSession, url: str) -> str:
    digest = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200
        async for block in resp.content.iter_chunked(MiB):
            digest.update(block)
    return digest.hexdigest()


async def patch_until_killed(
    session: aiohttp.ClientSession,
    server: ServerProcess,
    work_dir: Path,
    url: str,
    offset: int,
    body: bytes,
    kill_at: int,
    *,
    pending: bool = False,
    before_kill: Callable[[], Awaitable[None]] | None = None,
    **headers: str,
) -> int:
    """PATCH `body` at `offset` slowly (64 KiB blocks with small sleeps) and SIGKILL the server
    once at least `kill_at` bytes of the upload are on its disk. Returns the bytes handed to the
    client's socket, which bounds what the server can have received."""
    uid = upload_id(url)
    sent = 0

    async def slow_body() -> AsyncIterator[bytes]:
        nonlocal sent
        for i in range(0, len(body), BLOCK):
            block = body[i : i + BLOCK]
            yield block
            sent += len(block)
            await asyncio.sleep(0.001)
            if offset + sent >= kill_at + 4 * BLOCK or sent == len(body):
                break
        await wait_on_disk(work_dir, uid, kill_at, pending=pending)
        if before_kill is not None:
            await before_kill()  # still mid-body: the rest of the body is never sent
        sigkill(server)

    with pytest.raises((aiohttp.ClientError, ConnectionError)):
        async with session.patch(
            url,
            data=slow_body(),
            headers={
                **OCTET,
                "Upload-Offset": str(offset),
                "Content-Length": str(len(body)),  # as TUS clients do: the whole rest is announced
                **headers,
            },
        ) as resp:
            pytest.fail(f"the PATCH was answered ({resp.status}) although the server was killed")
    assert server.process.poll() == -signal.SIGKILL
    return sent


def assert_store_consistent(work_dir: Path, uid: str, offset: int, size: int) -> dict[str, Any]:
    """The offset HEAD reports is what is on disk, and the info file is readable JSON."""
    store = uploads_dir(work_dir)
    assert bin_size(work_dir, uid) == offset
    info = json.loads((store / f"{uid}.info").read_text())
    assert info["id"] == uid
    assert info["size"] == size
    assert not list(store.glob("*.tmp")), "a half-written info file survived the restart"
    assert not (store / f"{uid}.pending").exists()
    return dict(info)


def session() -> aiohttp.ClientSession:
    # One connection per request: a connection to a killed server is never reused.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_9_mid_patch_then_resume(tmp_path: Path, seed: int) -> None:
    """Two SIGKILLs at random points of the body, a restart after each, then the rest: the
    offset after each restart is what is on disk and no more than was sent; the result is the
    source, byte for byte."""
    rng = random.Random(seed)
    source = rng.randbytes(SIZE)
    kill_points = sorted(rng.sample(range(MiB, SIZE - MiB, BLOCK), 2))

    async with session() as http:
        with gateway(tmp_path) as server:
            url = await create(http, server.endpoint, SIZE, **{"Upload-Metadata": METADATA})
        uid = upload_id(url)
        offset = 0
        for kill_at in kill_points:
            kill_at = max(kill_at, offset + BLOCK)
            with gateway(tmp_path) as server:
                url = server.endpoint + uid  # a new port after each restart
                on_disk_before = bin_size(tmp_path, uid)
                assert on_disk_before == offset
                sent = await patch_until_killed(
                    http, server, tmp_path, url, offset, source[offset:], kill_at
                )
                on_disk_at_kill = bin_size(tmp_path, uid)
            with gateway(tmp_path) as server:
                url = server.endpoint + uid
                headers = await head(http, url)
                new_offset = int(headers["Upload-Offset"])
                # Nothing that reached the disk is lost, nothing that was not sent is counted.
                assert kill_at <= on_disk_at_kill <= new_offset <= offset + sent
                assert headers["Upload-Length"] == str(SIZE)
                assert headers["Upload-Metadata"] == METADATA
                assert_store_consistent(tmp_path, uid, new_offset, SIZE)
            offset = new_offset

        with gateway(tmp_path) as server:
            url = server.endpoint + uid
            assert await patch(http, url, offset, source[offset:]) == SIZE
            assert (await head(http, url))["Upload-Offset"] == str(SIZE)
            assert await sha256_of_get(http, url) == hashlib.sha256(source).hexdigest()


async def test_kill_9_during_checksummed_patch_discards_the_unverified_chunk(
    tmp_path: Path,
) -> None:
    """A chunk with Upload-Checksum is all-or-nothing, across a crash too: after the restart the
    offset is where the chunk started, although part of it had reached the disk."""
    rng = random.Random(7)
    size = 8 * MiB
    source = rng.randbytes(size)
    first = MiB
    chunk = source[first:]
    checksum = "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode()

    async with session() as http:
        with gateway(tmp_path) as server:
            url = await create(http, server.endpoint, size)
            uid = upload_id(url)
            assert await patch(http, url, 0, source[:first]) == first

            async def live_offset_check() -> None:
                # While the unverified chunk streams in, HEAD already says: not counted.
                assert (await head(http, url))["Upload-Offset"] == str(first)

            await patch_until_killed(
                http,
                server,
                tmp_path,
                url,
                first,
                chunk,
                first + 3 * MiB,
                pending=True,
                before_kill=live_offset_check,
                **{"Upload-Checksum": checksum},
            )
        assert bin_size(tmp_path, uid) >= first + 3 * MiB  # the chunk's bytes did reach the disk

        with gateway(tmp_path) as server:
            url = server.endpoint + uid
            assert (await head(http, url))["Upload-Offset"] == str(first)
            assert_store_consistent(tmp_path, uid, first, size)
            assert await patch(http, url, first, chunk, **{"Upload-Checksum": checksum}) == size
            assert await sha256_of_get(http, url) == hashlib.sha256(source).hexdigest()


@pytest.mark.parametrize("with_body", [False, True], ids=["creation", "creation-with-upload"])
async def test_kill_9_right_after_creation(tmp_path: Path, with_body: bool) -> None:
    """An upload acknowledged with 201 is readable after a crash that follows at once."""
    size = 3 * MiB
    source = random.Random(11).randbytes(size)
    prefix = source[: MiB // 2] if with_body else b""

    async with session() as http:
        with gateway(tmp_path) as server:
            headers = {**TUS, "Upload-Length": str(size), "Upload-Metadata": METADATA}
            if with_body:
                headers["Content-Type"] = "application/offset+octet-stream"
            body = io.BytesIO(prefix) if with_body else None
            async with http.post(server.endpoint, headers=headers, data=body) as resp:
                assert resp.status == 201, await resp.text()
                url = resp.headers["Location"]
            sigkill(server)
        uid = upload_id(url)

        with gateway(tmp_path) as server:
            url = server.endpoint + uid
            headers = await head(http, url)
            assert headers["Upload-Offset"] == str(len(prefix))
            assert headers["Upload-Length"] == str(size)
            assert headers["Upload-Metadata"] == METADATA
            assert_store_consistent(tmp_path, uid, len(prefix), size)
            assert await patch(http, url, len(prefix), source[len(prefix) :]) == size
            assert await sha256_of_get(http, url) == hashlib.sha256(source).hexdigest()


async def test_crash_while_the_checksum_marker_is_written_loses_nothing(tmp_path: Path) -> None:
    """`write_chunk` creates `<id>.pending` with `write_text` (open with O_CREAT|O_TRUNC, then
    write) before the chunk's first byte. A kill -9 between the two leaves an empty marker next
    to bytes that were all acknowledged; the restart must not truncate them because of it (the
    running gateway already reads an empty marker as "no chunk in flight")."""
    size = 2 * MiB
    source = random.Random(13).randbytes(size)
    acknowledged = MiB + 1234

    async with session() as http:
        with gateway(tmp_path) as server:
            url = await create(http, server.endpoint, size)
            uid = upload_id(url)
            assert await patch(http, url, 0, source[:acknowledged]) == acknowledged
            sigkill(server)
        # The state such a crash leaves on disk.
        (uploads_dir(tmp_path) / f"{uid}.pending").write_text("")

        with gateway(tmp_path) as server:
            url = server.endpoint + uid
            assert (await head(http, url))["Upload-Offset"] == str(acknowledged)
            assert_store_consistent(tmp_path, uid, acknowledged, size)
            assert await patch(http, url, acknowledged, source[acknowledged:]) == size
            assert await sha256_of_get(http, url) == hashlib.sha256(source).hexdigest()
