"""The TUS protocol through the gateway, on the filesystem store and on the S3 store side by side.

Real sockets: the gateway is served by aiohttp's test server, and the S3 store talks HTTP to a
moto S3 server. Sizes cross the 5 MiB part size of the S3 store, so parts, tails and the final
CompleteMultipartUpload are all exercised through the handlers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from typing import Any

import boto3
import pytest
from aiohttp.test_utils import TestClient
from botocore.config import Config

from gateway.app import create_app
from gateway.settings import load_settings
from gateway.store.kvrecords import KvRecords
from gateway.store.s3parts import MIN_PART_SIZE
from gateway.store.s3store import S3Store
from tests.gateway.conftest import TUS, ClientFactory, create_upload, offset_of, patch

PART = MIN_PART_SIZE
MiB = 1024 * 1024

@pytest.fixture(params=["file", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def gateway(
    request: pytest.FixtureRequest, store_kind: str, make_client: ClientFactory
) -> TestClient[Any, Any]:
    if store_kind == "file":
        return await make_client()
    endpoint: str = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    nats_url: str = request.getfixturevalue("nats_url")  # the S3 store's records live in NATS KV
    client = await make_client(
        store_kind="s3",
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        s3_part_size=PART,
        nats_url=nats_url,
        processing_enabled=False,
    )
    return client


def final_path(location: str) -> str:
    return "/files/" + location.rsplit("/", 1)[1]


async def test_creation_with_upload_and_head(gateway: TestClient[Any, Any]) -> None:
    data = os.urandom(PART + 10)
    resp = await gateway.post(
        "/files/",
        data=io.BytesIO(data),
        headers={
            **TUS,
            "Upload-Length": str(2 * len(data)),
            "Content-Type": "application/offset+octet-stream",
            "Upload-Metadata": "filename ZGF0YS5iaW4=,empty",
        },
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers["Upload-Offset"] == str(len(data))
    path = final_path(resp.headers["Location"])
    head = await gateway.head(path, headers=TUS)
    assert head.status == 200
    assert head.headers["Upload-Offset"] == str(len(data))
    assert head.headers["Upload-Length"] == str(2 * len(data))
    assert head.headers["Upload-Metadata"] == "filename ZGF0YS5iaW4=,empty"
    assert head.headers["Cache-Control"] == "no-store"


async def test_patch_resume_after_disconnect_across_parts(gateway: TestClient[Any, Any]) -> None:
    data = os.urandom(2 * PART + 12345)
    path = await create_upload(gateway, len(data))
    # The client goes away after 6 MiB of a PATCH that announced everything: what arrived is
    # kept (one part and a 1 MiB tail on S3), and the offset says so.
    _, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        f"PATCH {path} HTTP/1.1\r\nHost: {gateway.host}:{gateway.port}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data[: 6 * MiB]
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await writer.wait_closed()
    offset = 0
    for _ in range(100):
        offset = await offset_of(gateway, path)
        if offset == 6 * MiB:
            break
        await asyncio.sleep(0.05)
    assert offset == 6 * MiB
    # Resume in two more PATCHes, the first ending in the middle of a part.
    assert (await patch(gateway, path, offset, data[offset : offset + 3 * MiB])).status == 204
    offset += 3 * MiB
    assert (await patch(gateway, path, offset - 1, b"x")).status == 409  # no side effect
    resp = await patch(gateway, path, offset, data[offset:])
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == str(len(data))
    body = await (await gateway.get(path)).read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


async def test_get_range_across_a_part_boundary(gateway: TestClient[Any, Any]) -> None:
    data = os.urandom(PART + 1000)
    path = await create_upload(
        gateway, len(data), **{"Upload-Metadata": "filetype dGV4dC9wbGFpbg=="}
    )
    assert (await patch(gateway, path, 0, data)).status == 204
    resp = await gateway.get(path, headers={"Range": f"bytes={PART - 100}-{PART + 99}"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {PART - 100}-{PART + 99}/{len(data)}"
    assert await resp.read() == data[PART - 100 : PART + 100]
    resp = await gateway.get(path, headers={"Range": "bytes=-10"})
    assert await resp.read() == data[-10:]
    resp = await gateway.get(path)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/plain"
    assert await resp.read() == data


async def test_concatenation_with_small_and_large_partials(gateway: TestClient[Any, Any]) -> None:
    parts = [os.urandom(100), os.urandom(PART + 1), os.urandom(3000)]
    paths = []
    for part in parts:
        path = await create_upload(gateway, len(part), **{"Upload-Concat": "partial"})
        assert (await patch(gateway, path, 0, part)).status == 204
        paths.append(path)
    resp = await gateway.post(
        "/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(paths)}
    )
    assert resp.status == 201, await resp.text()
    final = final_path(resp.headers["Location"])
    head = await gateway.head(final, headers=TUS)
    assert (
        head.headers["Upload-Offset"] == head.headers["Upload-Length"] == str(sum(map(len, parts)))
    )
    assert await (await gateway.get(final)).read() == b"".join(parts)
    assert (await patch(gateway, final, 0, b"x")).status == 403


async def test_concatenation_unfinished(gateway: TestClient[Any, Any]) -> None:
    first, second = os.urandom(PART + 5), os.urandom(700)
    p1 = await create_upload(gateway, len(first), **{"Upload-Concat": "partial"})
    p2 = await create_upload(gateway, len(second), **{"Upload-Concat": "partial"})
    await patch(gateway, p1, 0, first)
    resp = await gateway.post("/files/", headers={**TUS, "Upload-Concat": f"final;{p1} {p2}"})
    final = final_path(resp.headers["Location"])
    await patch(gateway, p2, 0, second)
    head = await gateway.head(final, headers=TUS)
    for _ in range(200):  # assembled in the background
        if "Upload-Offset" in head.headers:
            break
        await asyncio.sleep(0.02)
        head = await gateway.head(final, headers=TUS)
    assert head.headers["Upload-Offset"] == str(len(first) + len(second))
    assert await (await gateway.get(final)).read() == first + second


async def test_termination(
    gateway: TestClient[Any, Any], store_kind: str, request: pytest.FixtureRequest
) -> None:
    path = await create_upload(gateway, 3 * PART)
    await patch(gateway, path, 0, os.urandom(PART + 7))
    assert (await gateway.delete(path, headers=TUS)).status == 204
    assert (await gateway.head(path, headers=TUS)).status == 404
    assert (await gateway.get(path)).status == 404
    assert (await gateway.delete(path, headers=TUS)).status == 404
    if store_kind == "s3":  # every object gone, the multipart upload aborted
        s3 = boto3.client(
            "s3", endpoint_url=request.getfixturevalue("s3_server"), region_name="us-east-1"
        )
        bucket = request.getfixturevalue("s3_bucket")
        assert s3.list_objects_v2(Bucket=bucket).get("Contents", []) == []
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        s3.close()


async def test_checksum_mismatch_discards_the_chunk(gateway: TestClient[Any, Any]) -> None:
    data = os.urandom(PART + 500)
    path = await create_upload(gateway, len(data) + 3)
    await patch(gateway, path, 0, b"abc")
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    resp = await patch(gateway, path, 3, data, **{"Upload-Checksum": f"sha1 {wrong}"})
    assert resp.status == 460
    assert await offset_of(gateway, path) == 3
    good = base64.b64encode(hashlib.sha1(data).digest()).decode()
    resp = await patch(gateway, path, 3, data, **{"Upload-Checksum": f"sha1 {good}"})
    assert resp.status == 204
    assert await (await gateway.get(path)).read() == b"abc" + data


async def test_deferred_length(gateway: TestClient[Any, Any]) -> None:
    data = os.urandom(PART + 3)
    path = await create_upload(gateway, None)
    assert (await patch(gateway, path, 0, data[:PART])).status == 204
    resp = await patch(gateway, path, PART, data[PART:], **{"Upload-Length": str(len(data))})
    assert resp.status == 204
    head = await gateway.head(path, headers=TUS)
    assert head.headers["Upload-Length"] == str(len(data))
    assert await (await gateway.get(path)).read() == data


async def test_options_lists_the_same_extensions(gateway: TestClient[Any, Any]) -> None:
    resp = await gateway.options("/files/")
    assert set(resp.headers["Tus-Extension"].split(",")) >= {
        "creation",
        "creation-defer-length",
        "termination",
        "concatenation",
        "checksum",
        "expiration",
    }


async def test_s3_down_is_503_and_nothing_breaks(
    aiohttp_client: Any, tmp_path: Any, s3_server: str, upload_records: KvRecords
) -> None:
    dead = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = S3Store(dead, "bucket", upload_records)
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})
    client = await aiohttp_client(create_app(settings, store=store))
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "10"})
    assert resp.status == 503
    assert "store unavailable" in await resp.text()
    # A HEAD needs no S3 request: the record in NATS KV answers it (here: no such upload).
    assert (await client.head("/files/" + "a" * 32, headers=TUS)).status == 404
    store.close()
    dead.close()


async def test_metrics_show_the_s3_buffer_budget(
    gateway: TestClient[Any, Any], store_kind: str
) -> None:
    data = os.urandom(PART + 3)
    path = await create_upload(gateway, len(data))
    assert (await patch(gateway, path, 0, data)).status == 204
    text = await (await gateway.get("/metrics")).text()
    if store_kind == "file":
        assert "tusgate_s3_buffer" not in text
        return
    assert f"tusgate_s3_buffer_limit_bytes {256 * MiB}" in text
    assert "tusgate_s3_buffer_bytes 0\n" in text  # every buffer given back after the PATCH
    assert "tusgate_s3_buffer_exhausted_total 0\n" in text
