"""Two `tusgate serve` processes, A and B, on different ports, sharing one nats-server and one S3
bucket (SPEC §2 "Scaled"): any instance serves any request of any upload.

* an upload begun on A finishes on B;
* PATCHes through A and B at the same offset at the same time never both write (the one-writer
  lock in NATS KV, gateway/locks_kv.py);
* `kill -9` of A in the middle of a PATCH: B resumes from what reached S3, once A's lock has
  aged out;
* B answers `/status` and streams `/progress` of an upload written through A.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.locks_kv import LOCK_TTL
from tests.scale.conftest import PART, Deployment, TusClient, metadata, wait_for

MiB = 1024 * 1024
BLOCK = 64 * 1024
#: Statuses allowed for a PATCH that raced another one (SPEC §3.1): it wrote (204), was taken
#: over by the newer one (400 ERR_UPLOAD_INTERRUPTED), found the offset moved (409), or could not
#: get the lock in time (423).
RACE_STATUSES = {204, 400, 409, 423}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def slow_body(data: bytes, *, pause: float, block: int = BLOCK) -> AsyncIterator[bytes]:
    for start in range(0, len(data), block):
        yield data[start : start + block]
        await asyncio.sleep(pause)


async def test_upload_begun_on_a_finishes_on_b(deployment: Deployment, tus: TusClient) -> None:
    a, b = deployment.gateways("a", "b")
    data = os.urandom(2 * PART + 12345)
    meta = metadata(filename="across.bin", filetype="application/octet-stream")
    uid = await tus.create(a.endpoint, len(data), **{"Upload-Metadata": meta})

    # Two PATCHes on A: one part uploaded to S3 and a tail (A's `.part` object) behind it.
    first = PART + 1000
    for start, end in ((0, 3 * MiB), (3 * MiB, first)):
        reply = await tus.patch(a.endpoint, uid, start, data[start:end])
        assert (reply.status, reply.offset) == (204, end)

    head = await tus.head(b.endpoint, uid)
    assert head.status == 200
    assert head.offset == first  # B sees A's offset: it is what S3 holds
    assert head.headers["Upload-Length"] == str(len(data))
    assert head.headers["Upload-Metadata"] == meta

    reply = await tus.patch(b.endpoint, uid, first, data[first:])
    assert (reply.status, reply.offset) == (204, len(data)), reply.body
    assert await tus.offset(a.endpoint, uid) == len(data)
    assert await tus.sha256(a.endpoint, uid) == sha256(data)
    assert await tus.sha256(b.endpoint, uid) == sha256(data)


async def race_patch(tus: TusClient, endpoint: str, uid: str, body: bytes, delay: float) -> int:
    """PATCH all of `body` at offset 0, slowly, after `delay`: its status, or -1 when the
    server ended the request while the body was still being sent."""
    await asyncio.sleep(delay)
    try:
        reply = await tus.patch(
            endpoint, uid, 0, slow_body(body, pause=0.002), **{"Content-Length": str(len(body))}
        )
    except (aiohttp.ClientError, ConnectionError):
        return -1
    return reply.status


@pytest.mark.parametrize("stagger", [0.0, 0.03, 0.1])
async def test_concurrent_patches_through_a_and_b_never_both_write(
    deployment: Deployment, tus: TusClient, stagger: float
) -> None:
    a, b = deployment.gateways("a", "b")
    rng = random.Random(f"race-{stagger}")
    size = PART + 512 * 1024  # crosses a part boundary: a part upload is among the writes
    for round_no in range(3):
        bodies = {"a": rng.randbytes(size), "b": rng.randbytes(size)}
        uid = await tus.create(a.endpoint, size)

        first, second = ("a", "b") if round_no % 2 == 0 else ("b", "a")
        endpoints = {"a": a.endpoint, "b": b.endpoint}
        statuses = dict(
            zip(
                (first, second),
                await asyncio.gather(
                    race_patch(tus, endpoints[first], uid, bodies[first], 0.0),
                    race_patch(tus, endpoints[second], uid, bodies[second], stagger),
                ),
                strict=True,
            )
        )
        offset = await tus.offset(b.endpoint, uid)
        print(f"round {round_no}: {first} first, {statuses}, {offset} bytes stored")
        assert set(statuses.values()) <= RACE_STATUSES | {-1}, statuses
        assert list(statuses.values()).count(204) <= 1, statuses

        # Whatever is stored came from one writer: a prefix of A's body or of B's. Finish the
        # upload with A's body and compare the whole content (S3 cannot read unfinished parts).
        if offset < size:
            reply = await tus.patch(b.endpoint, uid, offset, bodies["a"][offset:])
            assert (reply.status, reply.offset) == (204, size), reply.body
        content = await tus.download(a.endpoint, uid)
        assert len(content) == size
        writers = [n for n, body in bodies.items() if content[:offset] == body[:offset]]
        assert writers, f"round {round_no}: stored bytes mix both bodies ({statuses}, {offset})"
        assert content[offset:] == bodies["a"][offset:]
        if offset == size:  # one request wrote everything: it must be the one that said 204
            assert [n for n, s in statuses.items() if s == 204] == writers, statuses


async def test_patch_stuck_on_a_is_taken_over_by_b(deployment: Deployment, tus: TusClient) -> None:
    """SPEC §3.1: a new request for an upload whose previous request is stuck takes the lock
    over (the stuck one is ended) instead of waiting for a timeout -- across instances too."""
    a, b = deployment.gateways("a", "b")
    data = os.urandom(MiB + 99)
    uid = await tus.create(a.endpoint, len(data))
    # A stuck client: headers sent, then not one byte of its body. A holds the upload's lock.
    host, port = a.endpoint.split("//")[1].split("/")[0].split(":")
    _, stuck = await asyncio.open_connection(host, int(port))
    stuck.write(
        f"PATCH /files/{uid} HTTP/1.1\r\nHost: {host}:{port}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
    )
    await stuck.drain()
    try:
        await asyncio.sleep(0.5)  # A has taken the lock and waits for the body
        started = time.monotonic()
        reply = await tus.patch(b.endpoint, uid, 0, data)
        took = time.monotonic() - started
    finally:
        stuck.close()
    assert (reply.status, reply.headers.get("Upload-Offset")) == (204, str(len(data))), reply.body
    assert took < LOCK_TTL, f"B waited {took:.1f}s: the lock aged out instead of being taken over"
    assert await tus.sha256(a.endpoint, uid) == sha256(data)


async def test_kill_a_mid_patch_and_resume_on_b(deployment: Deployment, tus: TusClient) -> None:
    # B's PATCH waits for A's lock to age out (up to LOCK_TTL after A's last refresh).
    a, b = deployment.gateways("a", "b", TUSGATE_SERVER_LOCK_TIMEOUT=str(2 * LOCK_TTL))
    data = random.Random("kill").randbytes(3 * PART + 777)
    uid = await tus.create(a.endpoint, len(data))
    sent = 0
    killed = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for start in range(0, len(data), BLOCK):
            if killed.is_set():
                return
            yield data[start : start + BLOCK]
            sent = start + BLOCK
            # Fast up to two parts, then slowly: A is killed with bytes in flight.
            await asyncio.sleep(0.0 if sent < 2 * PART else 0.02)

    patch = asyncio.create_task(
        tus.patch(a.endpoint, uid, 0, body(), **{"Content-Length": str(len(data))})
    )

    async def parts_in_s3() -> bool:
        return await tus.offset(b.endpoint, uid) >= PART and sent >= 2 * PART + MiB

    await wait_for(parts_in_s3, timeout=30, what="A to upload a part and receive 11 MiB")
    a.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert a.process.wait(timeout=10) == -signal.SIGKILL
    killed.set()
    with pytest.raises((aiohttp.ClientError, ConnectionError)):
        await patch

    # Resume on B from what B says. The one-writer lock of the dead A is still in NATS KV
    # until it ages out; B waits for it (no 423). A request A sent to S3 just before dying may
    # still land after B's HEAD: then B answers 409, and a client HEADs again (bounded).
    for _ in range(3):
        offset = await tus.offset(b.endpoint, uid)
        assert PART <= offset <= sent, (offset, sent)
        reply = await tus.patch(b.endpoint, uid, offset, data[offset:])
        if reply.status != 409:
            break
    done_at = time.monotonic()
    assert (reply.status, reply.offset) == (204, len(data)), (reply.status, reply.body)
    # The dead A refreshed its lock at most LOCK_TTL/3 before dying: B cannot have written
    # before the lock aged out.
    assert done_at - killed_at >= LOCK_TTL * 2 / 3 - 0.5, done_at - killed_at
    assert await tus.sha256(b.endpoint, uid) == sha256(data)


async def sse_statuses(
    session: aiohttp.ClientSession, url: str, queue: asyncio.Queue[dict[str, Any]]
) -> None:
    async with session.get(url, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                await queue.put(json.loads(line[6:]))


async def test_b_shows_status_and_progress_of_an_upload_written_through_a(
    deployment: Deployment, tus: TusClient
) -> None:
    a, b = deployment.gateways("a", "b")
    data = os.urandom(PART + 4321)
    meta = metadata(filename="watched.bin")
    uid = await tus.create(a.endpoint, len(data), **{"Upload-Metadata": meta})
    reply = await tus.patch(a.endpoint, uid, 0, data[:MiB])
    assert reply.status == 204

    statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    watcher = asyncio.create_task(
        sse_statuses(tus.session, b.endpoint + uid + "/progress", statuses)
    )
    try:
        first = await asyncio.wait_for(statuses.get(), 10)
        assert (first["id"], first["state"], first["offset"]) == (uid, "receiving", MiB)

        reply = await tus.patch(a.endpoint, uid, MiB, data[MiB:], Prefer="respond-async")
        assert (reply.status, reply.offset) == (202, len(data)), reply.body
        assert reply.headers["Preference-Applied"] == "respond-async"
        assert reply.headers["Progress-Location"] == a.endpoint + uid + "/progress"

        # B's stream follows the events A emitted, through the KV projection.
        seen = [first]
        while not (seen[-1]["state"] == "received" and seen[-1]["offset"] == len(data)):
            seen.append(await asyncio.wait_for(statuses.get(), 15))
        assert [s["offset"] for s in seen] == sorted(s["offset"] for s in seen)  # never back
        assert seen[-1]["length"] == len(data)
        assert seen[-1]["metadata"] == {"filename": "watched.bin"}
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    status = await tus.status(b.endpoint, uid)
    assert status["id"] == uid
    assert (status["state"], status["offset"], status["length"]) == (
        "received",
        len(data),
        len(data),
    )
    assert status["metadata"] == {"filename": "watched.bin"}
    assert status == await tus.status(a.endpoint, uid)
    head = await tus.head(b.endpoint, uid)
    assert head.status == 200 and head.offset == len(data)
    assert head.headers["Tus-Resumable"] == "1.0.0"


async def test_progress_stream_on_b_outlives_a_quiet_spell(
    deployment: Deployment, tus: TusClient
) -> None:
    """A client that pauses its upload for longer than the SSE keep-alive interval: B's
    progress stream must stay open (keep-alive comments) and show the bytes sent afterwards."""
    from gateway.progress import KEEPALIVE

    a, b = deployment.gateways("a", "b")
    data = os.urandom(1000)
    uid = await tus.create(a.endpoint, len(data))
    statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    watcher = asyncio.create_task(
        sse_statuses(tus.session, b.endpoint + uid + "/progress", statuses)
    )
    try:
        assert (await asyncio.wait_for(statuses.get(), 10))["offset"] == 0
        await asyncio.sleep(KEEPALIVE + 1)  # the client pauses
        assert not watcher.done(), "B closed the progress stream of an upload still receiving"
        reply = await tus.patch(a.endpoint, uid, 0, data)
        assert reply.status == 204
        while (status := await asyncio.wait_for(statuses.get(), 10))["state"] != "received":
            pass
        assert status["offset"] == len(data)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
