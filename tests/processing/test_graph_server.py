"""The Graph test server enforces Microsoft's documented rules (not whatever our client does)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest

from processing.destinations.quickxor import quickxor_b64
from tests.graph_server import DEFAULT_TOKEN, GraphTestServer

UNIT = 320 * 1024
AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def create_session(
    http: httpx.AsyncClient, server: GraphTestServer, path: str = "doc.bin", **item: object
) -> str:
    response = await http.post(
        f"{server.base_url}/me/drive/root:/{path}:/createUploadSession",
        json={"item": item},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["nextExpectedRanges"] == ["0-"]
    assert body["expirationDateTime"].endswith("Z")
    return str(body["uploadUrl"])


def fragment(first: int, data: bytes, total: int) -> dict[str, str]:
    return {"Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}"}


async def test_api_calls_need_a_bearer_token(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = f"{graph_server.base_url}/me/drive/root:/a.bin:/createUploadSession"
    assert (await http.post(url, json={})).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await http.post(url, json={}, headers=wrong)).status_code == 401
    assert (
        await http.put(f"{graph_server.base_url}/me/drive/root:/a.bin:/content", content=b"x")
    ).status_code == 401


async def test_upload_url_refuses_authorization(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)
    assert "/v1.0/" not in url, "the uploadUrl is a different endpoint than the API"
    data = b"x" * 10
    response = await http.put(url, content=data, headers={**fragment(0, data, 10), **AUTH})
    assert response.status_code == 401
    assert graph_server.files() == {}


async def test_full_session_upload_returns_drive_item(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    data = bytes(range(256)) * (UNIT * 3 // 256) + b"tail"
    url = await create_session(http, graph_server, "folder/doc.bin")
    first = data[: 2 * UNIT]
    response = await http.put(url, content=first, headers=fragment(0, first, len(data)))
    assert response.status_code == 202
    assert response.json()["nextExpectedRanges"] == [f"{2 * UNIT}-"]
    status = await http.get(url)
    assert status.status_code == 200 and status.json()["nextExpectedRanges"] == [f"{2 * UNIT}-"]
    rest = data[2 * UNIT :]
    response = await http.put(url, content=rest, headers=fragment(2 * UNIT, rest, len(data)))
    assert response.status_code == 201
    item = response.json()
    assert item["name"] == "doc.bin" and item["size"] == len(data) and item["id"] and item["webUrl"]
    hashes = item["file"]["hashes"]
    assert hashes["sha256Hash"] == hashlib.sha256(data).hexdigest().upper()
    assert hashes["quickXorHash"] == quickxor_b64(data)
    assert graph_server.read_bytes("folder/doc.bin") == data
    assert (await http.get(url)).status_code == 404, "a completed session is gone"
    assert graph_server.open_sessions == 0


@pytest.mark.parametrize(
    ("first", "length", "declared_total", "status"),
    [
        (0, 1000, 5 * UNIT, 400),  # not the last fragment and not a multiple of 320 KiB
        (UNIT, UNIT, 5 * UNIT, 416),  # skips ahead: out of order
    ],
)
async def test_fragment_rules(
    http: httpx.AsyncClient,
    graph_server: GraphTestServer,
    first: int,
    length: int,
    declared_total: int,
    status: int,
) -> None:
    url = await create_session(http, graph_server)
    data = b"a" * length
    response = await http.put(url, content=data, headers=fragment(first, data, declared_total))
    assert response.status_code == status
    assert (await http.get(url)).json()["nextExpectedRanges"] == ["0-"]


async def test_bad_content_range_and_length(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)
    data = b"a" * UNIT
    for header in ("bytes 0-10", "bytes=0-327679/655360", "bytes 0-327679/*", "items 0-1/2", ""):
        response = await http.put(url, content=data, headers={"Content-Range": header})
        assert response.status_code == 400, header
    # Content-Length must equal the range length.
    response = await http.put(
        url, content=data[:100], headers={"Content-Range": f"bytes 0-{UNIT - 1}/{2 * UNIT}"}
    )
    assert response.status_code == 400


async def test_total_must_not_change_and_repeats_are_416(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)
    data = b"a" * UNIT
    assert (
        await http.put(url, content=data, headers=fragment(0, data, 3 * UNIT))
    ).status_code == 202
    assert (
        await http.put(url, content=data, headers=fragment(UNIT, data, 4 * UNIT))
    ).status_code == 400
    # "the client sent a fragment the server had already received" → 416
    assert (
        await http.put(url, content=data, headers=fragment(0, data, 3 * UNIT))
    ).status_code == 416


async def test_chunked_fragment_without_content_length(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 10

    response = await http.put(url, content=body(), headers={"Content-Range": "bytes 0-9/10"})
    assert response.status_code == 411


async def test_fragment_over_60_mib_is_refused(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)
    size = 60 * 1024 * 1024 + UNIT
    # The server must refuse on the headers alone; the body is never buffered.
    request = http.build_request(
        "PUT",
        url,
        content=b"\0" * size,
        headers={"Content-Range": f"bytes 0-{size - 1}/{size + UNIT}"},
    )
    assert (await http.send(request)).status_code == 413


async def test_delete_then_404_and_expiry(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    url = await create_session(http, graph_server)
    assert graph_server.open_sessions == 1
    assert (await http.delete(url)).status_code == 204
    assert (await http.delete(url)).status_code == 404
    assert (await http.get(url)).status_code == 404
    assert graph_server.open_sessions == 0

    url = await create_session(http, graph_server)
    graph_server.expire_sessions()
    assert graph_server.open_sessions == 0
    data = b"a" * 10
    assert (await http.put(url, content=data, headers=fragment(0, data, 10))).status_code == 404


async def test_conflict_behaviours(http: httpx.AsyncClient, graph_server: GraphTestServer) -> None:
    graph_server.put_file("dir/report.pdf", b"old")
    url = f"{graph_server.base_url}/me/drive/root:/dir/report.pdf:/createUploadSession"
    # fail is the default for createUploadSession
    assert (await http.post(url, json={}, headers=AUTH)).status_code == 409
    assert (
        await http.post(
            url, json={"item": {"@microsoft.graph.conflictBehavior": "fail"}}, headers=AUTH
        )
    ).status_code == 409
    # names compare case-insensitively, as on OneDrive
    upper = f"{graph_server.base_url}/me/drive/root:/DIR/Report.PDF:/createUploadSession"
    assert (await http.post(upper, json={}, headers=AUTH)).status_code == 409

    for behaviour, status, name in (
        ("rename", 201, "report 1.pdf"),
        ("replace", 200, "report.pdf"),
    ):
        upload_url = await create_session(
            http, graph_server, "dir/report.pdf", **{"@microsoft.graph.conflictBehavior": behaviour}
        )
        response = await http.put(upload_url, content=b"new", headers=fragment(0, b"new", 3))
        assert response.status_code == status, behaviour
        assert response.json()["name"] == name
    assert sorted(graph_server.files()) == ["dir/report 1.pdf", "dir/report.pdf"]
    assert graph_server.read_bytes("dir/report.pdf") == b"new"


async def test_conflict_at_commit(http: httpx.AsyncClient, graph_server: GraphTestServer) -> None:
    url = await create_session(http, graph_server, "late.bin")
    graph_server.put_file("late.bin", b"someone else")
    response = await http.put(url, content=b"mine", headers=fragment(0, b"mine", 4))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "nameAlreadyExists"
    assert graph_server.read_bytes("late.bin") == b"someone else"


async def test_simple_upload(http: httpx.AsyncClient, graph_server: GraphTestServer) -> None:
    url = f"{graph_server.base_url}/me/drive/root:/small.txt:/content"
    response = await http.put(url, content=b"hello", headers=AUTH)
    assert response.status_code == 201
    assert (
        response.json()["file"]["hashes"]["sha256Hash"]
        == hashlib.sha256(b"hello").hexdigest().upper()
    )
    # The default for PUT content is to replace.
    assert (await http.put(url, content=b"again", headers=AUTH)).status_code == 200
    failing = url + "?@microsoft.graph.conflictBehavior=fail"
    assert (await http.put(failing, content=b"x", headers=AUTH)).status_code == 409
    # "This method only supports files up to 4MB in size."
    big = b"\0" * (4 * 1024 * 1024 + 1)
    assert (await http.put(url, content=big, headers=AUTH)).status_code == 413
    assert graph_server.read_bytes("small.txt") == b"again"
    item = await http.get(f"{graph_server.base_url}/me/drive/root:/small.txt", headers=AUTH)
    assert item.status_code == 200 and item.json()["size"] == 5


async def test_invalid_names_are_refused(
    http: httpx.AsyncClient, graph_server: GraphTestServer
) -> None:
    for path in ("a%3Ab.txt", "trailing.%20", "dots./x", "a/%2E%2E/b"):
        response = await http.put(
            f"{graph_server.base_url}/me/drive/root:/{path}:/content", content=b"x", headers=AUTH
        )
        assert response.status_code == 400, path


async def test_drives_are_separate(http: httpx.AsyncClient, graph_server: GraphTestServer) -> None:
    for drive in ("me/drive", "drives/b!123", "users/alice@example.com/drive"):
        url = f"{graph_server.base_url}/{drive}/root:/same.txt:/content"
        assert (await http.put(url, content=drive.encode(), headers=AUTH)).status_code == 201
    assert graph_server.read_bytes("same.txt", drive="drives/b!123") == b"drives/b!123"
    assert (
        graph_server.read_bytes("same.txt", drive="users/alice@example.com")
        == b"users/alice@example.com/drive"
    )


async def test_fault_injection(http: httpx.AsyncClient, graph_server: GraphTestServer) -> None:
    url = await create_session(http, graph_server)
    data = b"a" * UNIT
    graph_server.fail("fragment", 429, retry_after=7)
    response = await http.put(url, content=data, headers=fragment(0, data, 2 * UNIT))
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    graph_server.fail("fragment", 503, retry_after=1, nth=3)
    graph_server.drop("fragment", after_bytes=1000, nth=2)
    with pytest.raises(httpx.TransportError):
        await http.put(url, content=data, headers=fragment(0, data, 2 * UNIT))
    # "all bytes in that request are ignored"
    assert (await http.get(url)).json()["nextExpectedRanges"] == ["0-"]
    assert (
        await http.put(url, content=data, headers=fragment(0, data, 2 * UNIT))
    ).status_code == 503
    assert (
        await http.put(url, content=data, headers=fragment(0, data, 2 * UNIT))
    ).status_code == 202
    graph_server.drop("fragment", response=True)
    with pytest.raises(httpx.TransportError):
        await http.put(url, content=data, headers=fragment(UNIT, data, 2 * UNIT))
    # The request was handled before the answer was lost: the file exists.
    assert graph_server.files()["doc.bin"].size == 2 * UNIT
    assert graph_server.pending_faults == 0
    assert graph_server.count("fragment") == 5
