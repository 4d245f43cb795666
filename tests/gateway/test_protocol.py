"""The TUS 1.0.0 protocol at /files/: every status code of SPEC §3.1 and each extension."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from typing import Any

from aiohttp.test_utils import TestClient

from tests.gateway.conftest import (
    OCTET,
    TUS,
    ClientFactory,
    create_upload,
    offset_of,
    patch,
    tus_context,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_options_advertises_what_the_store_can_do(client: TestClient[Any, Any]) -> None:
    resp = await client.options("/files/")  # no Tus-Resumable: OPTIONS ignores it
    assert resp.status == 204
    assert resp.headers["Tus-Version"] == "1.0.0"
    extensions = set(resp.headers["Tus-Extension"].split(","))
    assert extensions == {
        "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum",
        "termination", "concatenation", "concatenation-unfinished",
    }
    assert set(resp.headers["Tus-Checksum-Algorithm"].split(",")) >= {"sha1", "md5", "sha256", "sha512", "crc32"}
    assert int(resp.headers["Tus-Max-Size"]) > 0


async def test_expiration_not_advertised_when_disabled(make_client: ClientFactory) -> None:
    client = await make_client(store_expiration=0)
    resp = await client.options("/files/")
    assert "expiration" not in resp.headers["Tus-Extension"].split(",")


async def test_missing_or_wrong_version_is_412(client: TestClient[Any, Any]) -> None:
    for headers in ({}, {"Tus-Resumable": "0.2.2"}):
        resp = await client.post("/files/", headers={**headers, "Upload-Length": "1"})
        assert resp.status == 412
        assert resp.headers["Tus-Version"] == "1.0.0"
    assert not list(tus_context(client).settings.uploads_dir.iterdir())  # nothing created


async def test_create_patch_head_get_roundtrip(client: TestClient[Any, Any]) -> None:
    data = os.urandom(300_000)
    path = await create_upload(client, len(data), **{"Upload-Metadata": "filename aGVsbG8udHh0,empty"})
    resp = await client.head(path, headers=TUS)
    assert resp.status == 200
    assert resp.headers["Upload-Offset"] == "0"
    assert resp.headers["Upload-Length"] == str(len(data))
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Upload-Metadata"] == "filename aGVsbG8udHh0,empty"  # echoed exactly
    assert "Upload-Expires" in resp.headers

    resp = await patch(client, path, 0, data[:100_000])
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == "100000"
    resp = await patch(client, path, 100_000, data[100_000:])
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == str(len(data))

    resp = await client.get(path)
    assert resp.status == 200
    assert await resp.read() == data
    assert "hello.txt" in resp.headers["Content-Disposition"]


async def test_get_with_range(client: TestClient[Any, Any]) -> None:
    data = os.urandom(10_000)
    path = await create_upload(client, len(data))
    await patch(client, path, 0, data)
    resp = await client.get(path, headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == "bytes 100-199/10000"
    assert await resp.read() == data[100:200]
    resp = await client.get(path, headers={"Range": "bytes=-10"})
    assert await resp.read() == data[-10:]
    resp = await client.get(path, headers={"Range": "bytes=9990-"})
    assert await resp.read() == data[9990:]
    resp = await client.get(path, headers={"Range": "bytes=20000-"})
    assert resp.status == 416


async def test_offset_mismatch_is_409_without_side_effect(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 10)
    await patch(client, path, 0, b"abc")
    resp = await patch(client, path, 1, b"zzz")
    assert resp.status == 409
    assert await offset_of(client, path) == 3
    resp = await client.get(path)
    assert await resp.read() == b"abc"


async def test_patch_needs_offset_content_type(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 10)
    resp = await client.patch(
        path, data=b"abc", headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert await offset_of(client, path) == 0


async def test_unknown_upload_is_404(client: TestClient[Any, Any]) -> None:
    missing = "/files/" + "0" * 32
    assert (await client.head(missing, headers=TUS)).status == 404
    assert (await patch(client, missing, 0, b"x")).status == 404
    assert (await client.delete(missing, headers=TUS)).status == 404
    assert (await client.get(missing)).status == 404


async def test_upload_length_over_max_size_is_413(make_client: ClientFactory) -> None:
    client = await make_client(server_max_size=1000)
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1001"})
    assert resp.status == 413
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1000"})
    assert resp.status == 201


async def test_body_over_upload_length_is_413_and_nothing_written(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 5)
    resp = await patch(client, path, 0, b"0123456789")
    assert resp.status == 413
    assert await offset_of(client, path) == 0


async def test_chunked_body_over_length_keeps_what_fits(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 5)

    async def body() -> Any:
        yield b"0123"
        yield b"456789"

    resp = await client.patch(path, data=body(), headers={**OCTET, "Upload-Offset": "0"})
    assert resp.status == 413
    assert await offset_of(client, path) == 5
    assert await (await client.get(path)).read() == b"01234"


async def test_chunked_bodies_accepted(client: TestClient[Any, Any]) -> None:
    data = os.urandom(1_000_000)
    path = await create_upload(client, len(data))

    async def body() -> Any:
        for i in range(0, len(data), 65_536):
            yield data[i : i + 65_536]

    resp = await client.patch(path, data=body(), headers={**OCTET, "Upload-Offset": "0"})
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == str(len(data))
    assert hashlib.sha256(await (await client.get(path)).read()).digest() == hashlib.sha256(data).digest()


async def test_creation_with_upload(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/files/", data=b"hello", headers={**OCTET, "Upload-Length": "11"}
    )
    assert resp.status == 201
    assert resp.headers["Upload-Offset"] == "5"
    path = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    resp = await patch(client, path, 5, b" world")
    assert resp.status == 204
    assert await (await client.get(path)).read() == b"hello world"


async def test_zero_length_upload_is_complete_at_creation(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 0)
    resp = await client.head(path, headers=TUS)
    assert resp.headers["Upload-Offset"] == "0"
    assert "Upload-Expires" not in resp.headers  # complete uploads do not expire
    assert await (await client.get(path)).read() == b""


async def test_defer_length(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, None)
    resp = await client.head(path, headers=TUS)
    assert resp.headers["Upload-Defer-Length"] == "1"
    assert "Upload-Length" not in resp.headers
    await patch(client, path, 0, b"abc")
    resp = await patch(client, path, 3, b"de", **{"Upload-Length": "2"})
    assert resp.status == 400  # below the offset
    resp = await patch(client, path, 3, b"de", **{"Upload-Length": "5"})
    assert resp.status == 204
    resp = await client.head(path, headers=TUS)
    assert resp.headers["Upload-Length"] == "5"
    resp = await patch(client, path, 5, b"", **{"Upload-Length": "6"})
    assert resp.status == 400  # "MUST NOT be changed once set"


async def test_checksum_algorithms(client: TestClient[Any, Any]) -> None:
    data = b"some chunk of data"
    digests = {
        "sha1": hashlib.sha1(data).digest(),
        "md5": hashlib.md5(data).digest(),
        "sha256": hashlib.sha256(data).digest(),
        "sha512": hashlib.sha512(data).digest(),
        "crc32": zlib.crc32(data).to_bytes(4, "big"),
    }
    for algorithm, digest in digests.items():
        path = await create_upload(client, len(data))
        resp = await patch(client, path, 0, data, **{"Upload-Checksum": f"{algorithm} {b64(digest)}"})
        assert resp.status == 204, algorithm
        assert await offset_of(client, path) == len(data)


async def test_checksum_mismatch_is_460_and_chunk_discarded(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 10)
    await patch(client, path, 0, b"abc")
    wrong = b64(hashlib.sha1(b"other").digest())
    resp = await patch(client, path, 3, b"defg", **{"Upload-Checksum": f"sha1 {wrong}"})
    assert resp.status == 460
    assert await offset_of(client, path) == 3
    assert await (await client.get(path)).read() == b"abc"
    good = b64(hashlib.sha1(b"defg").digest())
    resp = await patch(client, path, 3, b"defg", **{"Upload-Checksum": f"sha1 {good}"})
    assert resp.status == 204


async def test_unknown_checksum_algorithm_is_400(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 3)
    resp = await patch(client, path, 0, b"abc", **{"Upload-Checksum": "whirlpool AAAA"})
    assert resp.status == 400
    assert await offset_of(client, path) == 0


async def test_termination(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 10)
    await patch(client, path, 0, b"abc")
    resp = await client.delete(path, headers=TUS)
    assert resp.status == 204
    assert (await client.head(path, headers=TUS)).status == 404
    assert (await client.get(path)).status == 404
    assert (await client.delete(path, headers=TUS)).status == 404


async def _partial(client: TestClient[Any, Any], data: bytes, finish: bool = True) -> str:
    path = await create_upload(client, len(data), **{"Upload-Concat": "partial"})
    if finish:
        resp = await patch(client, path, 0, data)
        assert resp.status == 204
    return path


async def test_concatenation_absolute_and_relative_urls(client: TestClient[Any, Any]) -> None:
    parts = [os.urandom(1000), os.urandom(2000), os.urandom(10)]
    paths = [await _partial(client, p) for p in parts]
    absolute = str(client.make_url(paths[0]))
    concat = f"final;{absolute} {paths[1]} {paths[2]}"
    resp = await client.post("/files/", headers={**TUS, "Upload-Concat": concat})
    assert resp.status == 201
    final = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    head = await client.head(final, headers=TUS)
    assert head.headers["Upload-Offset"] == "3010"
    assert head.headers["Upload-Length"] == "3010"
    assert head.headers["Upload-Concat"].startswith("final;")
    assert await (await client.get(final)).read() == b"".join(parts)
    # "The Server MUST respond with 403 Forbidden to PATCH requests against a final upload"
    assert (await patch(client, final, 3010, b"x")).status == 403
    partial_head = await client.head(paths[0], headers=TUS)
    assert partial_head.headers["Upload-Concat"] == "partial"


async def test_concatenation_unfinished(client: TestClient[Any, Any]) -> None:
    first, second = os.urandom(500), os.urandom(700)
    p1 = await _partial(client, first)
    p2 = await _partial(client, second, finish=False)
    resp = await client.post("/files/", headers={**TUS, "Upload-Concat": f"final;{p1} {p2}"})
    assert resp.status == 201
    final = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
    head = await client.head(final, headers=TUS)
    assert head.status == 200
    assert "Upload-Offset" not in head.headers  # unfinished final: no offset yet
    await patch(client, p2, 0, second)
    for _ in range(100):  # the final is assembled in the background; bounded wait
        head = await client.head(final, headers=TUS)
        if "Upload-Offset" in head.headers:
            break
    assert head.headers["Upload-Offset"] == "1200"
    assert await (await client.get(final)).read() == first + second


async def test_final_of_non_partial_is_rejected(client: TestClient[Any, Any]) -> None:
    plain = await create_upload(client, 3)
    await patch(client, plain, 0, b"abc")
    resp = await client.post("/files/", headers={**TUS, "Upload-Concat": f"final;{plain}"})
    assert resp.status == 400
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Concat": "final;http://elsewhere.example/files/" + "a" * 32}
    )
    assert resp.status == 400


async def test_method_override(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 3)
    resp = await client.post(
        path, data=b"abc", headers={**OCTET, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"}
    )
    assert resp.status == 204
    resp = await client.post(path, headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
    assert resp.status == 200
    resp = await client.post(path, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
    assert resp.status == 204
    assert (await client.head(path, headers=TUS)).status == 404


async def test_cors(client: TestClient[Any, Any]) -> None:
    resp = await client.options(
        "/files/",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH",
                 "Access-Control-Request-Headers": "upload-offset,tus-resumable"},
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Upload-Offset" in resp.headers["Access-Control-Allow-Headers"]
    assert "PATCH" in resp.headers["Access-Control-Allow-Methods"]
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", "Origin": "https://app.example"})
    exposed = resp.headers["Access-Control-Expose-Headers"]
    for header in ("Location", "Upload-Offset", "Progress-Location", "Preference-Applied", "Tus-Resumable"):
        assert header in exposed


async def test_location_behind_proxy(make_client: ClientFactory) -> None:
    proxied = await make_client(server_behind_proxy=True)
    resp = await proxied.post(
        "/files/", headers={**TUS, "Upload-Length": "1", "Forwarded": 'proto=https;host="up.example"'}
    )
    assert resp.headers["Location"].startswith("https://up.example/files/")
    resp = await proxied.post(
        "/files/",
        headers={**TUS, "Upload-Length": "1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "x.example"},
    )
    assert resp.headers["Location"].startswith("https://x.example/files/")
    direct = await make_client()
    resp = await direct.post("/files/", headers={**TUS, "Upload-Length": "1", "X-Forwarded-Host": "x.example"})
    assert "x.example" not in resp.headers["Location"]  # not trusted unless behind a proxy


async def test_owner_recorded(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 1)
    info = await tus_context(client).store.core.get_info(path.rsplit("/", 1)[1])
    assert info.owner == "anonymous"
