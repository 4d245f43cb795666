"""One writer per upload: disconnects keep bytes, concurrent PATCHes never interleave, and a new
request takes a stuck one over instead of waiting for a timeout."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp.test_utils import TestClient

from tests.gateway.conftest import OCTET, ClientFactory, create_upload, offset_of, patch


async def open_patch(client: TestClient[Any, Any], path: str, offset: int, declared: int, sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw PATCH that declares `declared` bytes but sends only `sent` and then waits."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n"
        f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Upload-Offset: {offset}\r\nContent-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + sent)
    await writer.drain()
    return reader, writer


async def wait_for_offset(client: TestClient[Any, Any], path: str, expected: int) -> int:
    for _ in range(200):
        current = await offset_of(client, path)
        if current == expected:
            return current
        await asyncio.sleep(0.02)
    return await offset_of(client, path)


async def test_disconnect_mid_patch_keeps_bytes_then_resume(client: TestClient[Any, Any]) -> None:
    data = os.urandom(2_000_000)
    path = await create_upload(client, len(data))
    _, writer = await open_patch(client, path, 0, len(data), data[:750_000])
    assert await wait_for_offset(client, path, 750_000) == 750_000
    writer.close()  # the client goes away mid-body
    await writer.wait_closed()
    assert await wait_for_offset(client, path, 750_000) == 750_000
    resp = await patch(client, path, 750_000, data[750_000:])
    assert resp.status == 204
    assert await (await client.get(path)).read() == data


async def test_new_request_takes_over_a_stuck_one(make_client: ClientFactory) -> None:
    client = await make_client(server_idle_timeout=60)  # the stuck request would hang for a minute
    data = os.urandom(500_000)
    path = await create_upload(client, len(data))
    reader, writer = await open_patch(client, path, 0, len(data), data[:100_000])
    assert await wait_for_offset(client, path, 100_000) == 100_000
    # The resuming client asks where to continue, then continues: it must not wait for the idle
    # timeout of the stuck request (pytest's timeout would fire long before 60 s).
    resp = await asyncio.wait_for(patch(client, path, 100_000, data[100_000:]), timeout=10)
    assert resp.status == 204
    assert await (await client.get(path)).read() == data
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    assert answer == b"" or b" 400 " in answer.split(b"\r\n")[0]  # told it was taken over
    writer.close()
    await writer.wait_closed()


async def test_concurrent_patches_never_both_write(client: TestClient[Any, Any]) -> None:
    size = 400_000
    path = await create_upload(client, size)
    bodies = [bytes([i]) * size for i in range(1, 6)]

    async def slow(body: bytes) -> Any:
        for i in range(0, len(body), 40_000):
            yield body[i : i + 40_000]
            await asyncio.sleep(0.005)

    async def send(body: bytes) -> int:
        resp = await client.patch(path, data=slow(body), headers={**OCTET, "Upload-Offset": "0"})
        return resp.status

    statuses = await asyncio.gather(*(send(b) for b in bodies), return_exceptions=True)
    content = await (await client.get(path)).read()
    # Whatever won, the stored bytes come from one writer only, from offset 0 on.
    assert content, statuses
    assert len(set(content)) == 1, "bytes of two writers interleaved"
    assert all(s in (204, 400, 409, 423) or isinstance(s, Exception) for s in statuses), statuses
    assert await offset_of(client, path) == len(content)


async def test_delete_ends_a_running_patch(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 1_000_000)
    _, writer = await open_patch(client, path, 0, 1_000_000, b"x" * 1000)
    await wait_for_offset(client, path, 1000)
    from tests.gateway.conftest import TUS

    resp = await asyncio.wait_for(client.delete(path, headers=TUS), timeout=10)
    assert resp.status == 204
    assert (await client.head(path, headers=TUS)).status == 404
    writer.close()
    await writer.wait_closed()


async def test_concurrent_uploads_per_owner_are_limited(make_client: ClientFactory) -> None:
    """server.max_uploads_per_owner = 2: a third body of the same owner streaming at once is
    answered 429 (one line, Retry-After) before a byte is read; once one ends, it goes through."""
    client = await make_client(server_max_uploads_per_owner=2)
    data = os.urandom(100_000)
    paths = [await create_upload(client, len(data)) for _ in range(3)]
    stalled = [await open_patch(client, p, 0, len(data), data[:10_000]) for p in paths[:2]]
    for _ in range(200):  # both bodies are streaming (their first bytes are stored)
        if [await offset_of(client, p) for p in paths[:2]] == [10_000, 10_000]:
            break
        await asyncio.sleep(0.02)
    refused = await patch(client, paths[2], 0, data)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "2"
    assert "too many concurrent uploads" in (text := await refused.text())
    assert text.count("\n") <= 1
    assert await offset_of(client, paths[2]) == 0  # nothing of it was read
    posted = await client.post(  # creation-with-upload counts as well
        "/files/", data=data, headers={**OCTET, "Upload-Length": str(len(data))}
    )
    assert posted.status == 429
    assert "Location" not in posted.headers  # refused before the upload was created
    _, writer = stalled[0]
    writer.close()  # the first client goes away: its slot is free again
    await wait_for_offset(client, paths[0], 10_000)
    for _ in range(100):
        response = await patch(client, paths[2], 0, data)
        if response.status != 429:
            break
        await asyncio.sleep(0.05)
    assert response.status == 204
    stalled[1][1].close()
