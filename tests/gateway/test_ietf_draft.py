"""The IETF "Resumable Uploads for HTTP" draft (interop versions 5 and 6) on the TUS endpoint,
with raw requests as the draft describes them (tus-js-client speaks it too: tests/js)."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.gateway.conftest import TUS

DRAFT = {"Upload-Draft-Interop-Version": "6"}


async def create(client: TestClient[Any, Any], body: bytes | None, **headers: str) -> Any:
    return await client.post(
        "/files/",
        data=io.BytesIO(body) if body is not None else None,
        headers={**DRAFT, **headers},
    )


async def test_a_whole_upload_in_one_request(client: TestClient[Any, Any]) -> None:
    data = os.urandom(300_000)
    resp = await create(client, data, **{"Upload-Complete": "?1", "Content-Type": "image/png"})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Upload-Draft-Interop-Version"] == "6"
    assert resp.headers["Upload-Complete"] == "?1"
    assert resp.headers["Upload-Offset"] == str(len(data))
    assert "Tus-Resumable" not in resp.headers
    path = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    assert await (await client.get(path)).read() == data


@pytest.mark.parametrize("version", ["5", "6"])
async def test_resume_after_an_interrupted_append(client: TestClient[Any, Any], version: str) -> None:
    draft = {"Upload-Draft-Interop-Version": version}
    data = os.urandom(500_000)
    resp = await client.post(
        "/files/", data=io.BytesIO(data[:100_000]), headers={**draft, "Upload-Complete": "?0"}
    )
    assert resp.status == 201
    assert resp.headers["Upload-Complete"] == "?0"
    path = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    head = await client.head(path, headers=draft)
    assert head.status == 204
    assert (head.headers["Upload-Offset"], head.headers["Upload-Complete"]) == ("100000", "?0")
    assert head.headers["Cache-Control"] == "no-store"
    append = {**draft, "Content-Type": "application/partial-upload"}
    resp = await client.patch(
        path,
        data=io.BytesIO(data[100_000:300_000]),
        headers={**append, "Upload-Offset": "100000", "Upload-Complete": "?0"},
    )
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "300000"
    # A stale offset: 409 with the offset the client should resume from, and nothing changes.
    stale = await client.patch(
        path, data=b"xx", headers={**append, "Upload-Offset": "5", "Upload-Complete": "?0"}
    )
    assert stale.status == 409 and stale.headers["Upload-Offset"] == "300000"
    resp = await client.patch(
        path,
        data=io.BytesIO(data[300_000:]),
        headers={**append, "Upload-Offset": "300000", "Upload-Complete": "?1"},
    )
    assert resp.status == 204, await resp.text()
    assert resp.headers["Upload-Complete"] == "?1"
    head = await client.head(path, headers=draft)
    assert (head.headers["Upload-Offset"], head.headers["Upload-Complete"]) == ("500000", "?1")
    assert await (await client.get(path)).read() == data


async def test_cancel_and_bad_requests(client: TestClient[Any, Any]) -> None:
    resp = await create(client, b"abc", **{"Upload-Complete": "?0"})
    path = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    assert (await client.delete(path, headers=DRAFT)).status == 204
    assert (await client.head(path, headers=DRAFT)).status == 404
    missing = await create(client, b"abc")  # no Upload-Complete
    assert missing.status == 400 and "Upload-Complete" in await missing.text()
    bad = await create(client, b"abc", **{"Upload-Complete": "yes"})
    assert bad.status == 400
    unknown = await client.post(
        "/files/", data=b"abc", headers={"Upload-Draft-Interop-Version": "99", "Upload-Complete": "?1"}
    )
    assert unknown.status == 400 and "not supported" in await unknown.text()
    # A TUS request with the draft header too is plain TUS.
    tus = await client.post("/files/", headers={**TUS, **DRAFT, "Upload-Length": "3"})
    assert tus.status == 201 and tus.headers["Tus-Resumable"] == "1.0.0"
