"""Expiration: unfinished uploads idle past `store_expiration` lose their bytes and answer 410.

The sweeper (gateway/expiry.py) runs every `store_sweep_interval`; `sweep_expired(ctx, now=...)`
is also called directly for deterministic checks. Waits for the real sweeper are bounded polls
that end on an observed state, never assertions about how long something took.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.expiry import sweep_expired
from gateway.lifecycle import Lifecycle
from gateway.settings import load_settings
from gateway.store.base import UploadInfo
from tests.gateway.conftest import (
    OCTET,
    TUS,
    ClientFactory,
    create_upload,
    offset_of,
    patch,
    tus_context,
)

# 1 s rather than 0.3 s: the POST and PATCH that precede a wait must not race the sweeper on a
# loaded CI machine. Sweeps every 0.1 s.
FAST = {"store_expiration": 1.0, "store_sweep_interval": 0.1}
NO_SWEEPER = {"store_expiration": 3600.0, "store_sweep_interval": 3600.0}
POLL = 0.05
POLL_ROUNDS = 400  # 20 s at most; the sweeper needs ~1.1 s


def upload_id(path: str) -> str:
    return path.rsplit("/", 1)[1]


def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "uploads"


async def wait_until_gone(client: TestClient[Any, Any], path: str) -> None:
    """Until HEAD answers 410 (the sweeper got to it). Bounded."""
    status = 0
    for _ in range(POLL_ROUNDS):
        resp = await client.head(path, headers=TUS)
        status = resp.status
        if status == 410:
            return
        assert status == 200, status
        await asyncio.sleep(POLL)
    raise AssertionError(f"upload {path} never expired (HEAD still {status})")


def expires_header(resp: Any) -> float:
    return parsedate_to_datetime(resp.headers["Upload-Expires"]).timestamp()


async def test_upload_expires_on_post_patch_head(make_client: ClientFactory) -> None:
    """ "The Server MAY include the Upload-Expires header ... in the response to POST, PATCH and
    HEAD" -- for an unfinished upload, `store_expiration` after its last byte (HTTP date, 1 s)."""
    client = await make_client(**NO_SWEEPER)
    before = time.time()
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "10"})
    after = time.time()
    assert resp.status == 201
    path = "/files/" + upload_id(resp.headers["Location"])
    assert before + 3600 - 1 <= expires_header(resp) <= after + 3600 + 1

    before = time.time()
    resp = await patch(client, path, 0, b"01234")
    after = time.time()
    assert resp.status == 204
    assert before + 3600 - 1 <= expires_header(resp) <= after + 3600 + 1

    resp = await client.head(path, headers=TUS)
    assert resp.status == 200
    assert before + 3600 - 1 <= expires_header(resp) <= after + 3600 + 1

    # A finished upload does not expire: no Upload-Expires once the last byte is in.
    resp = await patch(client, path, 5, b"56789")
    assert resp.status == 204
    assert "Upload-Expires" not in resp.headers
    assert "Upload-Expires" not in (await client.head(path, headers=TUS)).headers

    # Deferred length: unfinished whatever its offset, so it expires too.
    deferred = await create_upload(client, None)
    assert "Upload-Expires" in (await client.head(deferred, headers=TUS)).headers


async def test_no_expiration_configured_means_no_header(make_client: ClientFactory) -> None:
    client = await make_client(store_expiration=0)
    path = await create_upload(client, 10)
    resp = await client.head(path, headers=TUS)
    assert "Upload-Expires" not in resp.headers
    assert await sweep_expired(tus_context(client), now=time.time() + 10**9) == []
    assert (await client.head(path, headers=TUS)).status == 200


async def test_expired_upload_is_410_and_its_bytes_are_gone(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await make_client(**FAST)
    resp = await client.options("/files/")
    assert "expiration" in resp.headers["Tus-Extension"].split(",")
    path = await create_upload(client, 100)
    assert (await patch(client, path, 0, b"x" * 40)).status == 204
    bin_file = store_dir(tmp_path) / f"{upload_id(path)}.bin"
    assert bin_file.exists()

    await wait_until_gone(client, path)

    assert not bin_file.exists()
    assert (store_dir(tmp_path) / f"{upload_id(path)}.info").exists()  # the tombstone
    head = await client.head(path, headers=TUS)
    assert head.status == 410
    assert "Upload-Offset" not in head.headers
    resp = await patch(client, path, 40, b"y" * 60)
    assert resp.status == 410
    assert (await resp.text()).count("\n") == 1
    assert (await client.get(path)).status == 410
    assert not bin_file.exists()  # the refused PATCH did not bring a bytes file back


async def test_finished_upload_does_not_expire(make_client: ClientFactory) -> None:
    client = await make_client(**FAST)
    finished = await create_upload(client, 10)
    assert (await patch(client, finished, 0, b"0123456789")).status == 204
    empty = await create_upload(client, 0)  # complete at creation
    # An unfinished upload created after them: once it has expired, sweeps have run that saw
    # the finished ones idle for longer than the expiration.
    witness = await create_upload(client, 10)
    await wait_until_gone(client, witness)

    assert await offset_of(client, finished) == 10
    assert await (await client.get(finished)).read() == b"0123456789"
    assert await offset_of(client, empty) == 0
    assert (await client.get(empty)).status == 200


async def test_upload_receiving_bytes_is_not_swept_mid_request(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """The body stalls (well within the idle timeout) for longer than the expiration, while the
    real sweeper runs and a direct sweep far in the future runs: the PATCH still completes."""
    client = await make_client(**FAST, server_idle_timeout=60.0)
    ctx = tus_context(client)
    data = os.urandom(200_000)
    path = await create_upload(client, len(data))
    uid = upload_id(path)
    half = len(data) // 2
    checked: dict[str, Any] = {}

    async def stalled_body() -> AsyncIterator[bytes]:
        yield data[:half]
        for _ in range(POLL_ROUNDS):  # until the server has stored the first half
            if (await ctx.store.core.get_info(uid)).offset == half:
                break
            await asyncio.sleep(POLL)
        # Deterministic: even "a year later", the sweeper leaves a locked upload alone.
        checked["direct"] = await sweep_expired(ctx, now=time.time() + 365 * 86400)
        # And the real one: this witness, idle since after our last byte, expires first.
        checked["witness"] = await create_upload(client, 10)
        await wait_until_gone(client, checked["witness"])
        yield data[half:]

    resp = await client.patch(path, data=stalled_body(), headers={**OCTET, "Upload-Offset": "0"})
    assert resp.status == 204, await resp.text()
    assert checked["direct"] == []  # the only upload there was ours, and it was locked
    assert resp.headers["Upload-Offset"] == str(len(data))
    assert await (await client.get(path)).read() == data
    assert (store_dir(tmp_path) / f"{uid}.bin").exists()


class RecordingLifecycle(Lifecycle):
    def __init__(self) -> None:
        self.expired_ids: list[str] = []

    async def expired(self, info: UploadInfo) -> None:
        self.expired_ids.append(info.id)


async def test_sweep_expired_directly(aiohttp_client: Any, tmp_path: Path) -> None:
    """`sweep_expired(ctx, now=...)`: the boundary is `updated_at + store_expiration`; finished,
    locked and already expired uploads are left alone; the lifecycle hears each expiry once."""
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})
    lifecycle = RecordingLifecycle()
    client = await aiohttp_client(create_app(settings.replace(**NO_SWEEPER), lifecycle=lifecycle))
    ctx = tus_context(client)

    unfinished = await create_upload(client, 100)
    assert (await patch(client, unfinished, 0, b"a" * 10)).status == 204
    deferred = await create_upload(client, None)
    finished = await create_upload(client, 3)
    assert (await patch(client, finished, 0, b"abc")).status == 204
    locked = await create_upload(client, 5)
    final_parts = [await create_upload(client, 2, **{"Upload-Concat": "partial"}) for _ in range(2)]
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(final_parts)}
    )
    assert resp.status == 201  # a final of unfinished partials: it never expires itself

    unfinished_ones = (unfinished, deferred, locked, *final_parts)
    infos = {p: await ctx.store.core.get_info(upload_id(p)) for p in unfinished_ones}
    deadline = {p: ctx.expires_at(info) for p, info in infos.items()}
    assert all(d is not None for d in deadline.values())
    earliest = min(d for d in deadline.values() if d is not None)
    latest = max(d for d in deadline.values() if d is not None)

    assert await sweep_expired(ctx, now=earliest - 0.001) == []
    assert await offset_of(client, unfinished) == 10

    async with ctx.locker.hold(upload_id(locked)):
        swept = await sweep_expired(ctx, now=latest)
    expected = {upload_id(unfinished), upload_id(deferred), *map(upload_id, final_parts)}
    assert set(swept) == expected
    assert sorted(lifecycle.expired_ids) == sorted(swept)

    for path in (unfinished, deferred):
        assert (await client.head(path, headers=TUS)).status == 410
        assert not (store_dir(tmp_path) / f"{upload_id(path)}.bin").exists()
    assert await offset_of(client, locked) == 0
    assert await offset_of(client, finished) == 3

    # Once released, the locked one goes at the next sweep; tombstones are not swept twice.
    assert await sweep_expired(ctx, now=latest) == [upload_id(locked)]
    assert await sweep_expired(ctx, now=latest + 10**6) == []
    assert len(lifecycle.expired_ids) == len(expected) + 1
    assert await offset_of(client, finished) == 3
    assert await (await client.get(finished)).read() == b"abc"


async def test_expired_upload_survives_a_restart_as_410(make_client: ClientFactory) -> None:
    """The tombstone is on disk: a new app on the same data dir still answers 410."""
    client = await make_client(**NO_SWEEPER)
    path = await create_upload(client, 10)
    swept = await sweep_expired(tus_context(client), now=time.time() + 7200)
    assert swept == [upload_id(path)]
    restarted = await make_client(**NO_SWEEPER)
    assert (await restarted.head(path, headers=TUS)).status == 410
    resp = await restarted.patch(
        path, data=io.BytesIO(b"0123456789"), headers={**OCTET, "Upload-Offset": "0"}
    )
    assert resp.status == 410
