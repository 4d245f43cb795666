"""Malformed requests (SPEC §8): each gets a 4xx with a one-line reason -- never a 500, never a
hang, never a file outside the store -- and nothing already stored changes.

Where aiohttp's client would refuse to send the malformed thing, the request is written on a raw
socket. Requests that aiohttp's own HTTP parser refuses (broken framing, huge headers) get its
400/431 page, which is not ours to word: for those only the 4xx is checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.lifecycle import Completion, Lifecycle
from gateway.settings import load_settings
from gateway.store.base import UploadInfo
from tests.gateway.conftest import OCTET, TUS, ClientFactory, create_upload, offset_of, patch

TIMEOUT = 10.0  # bound on every raw read: "never a hang"
STORED = b"0123456789"  # what the `stored` upload holds before each bad request
POLL = 0.02
POLL_ROUNDS = 500


# -- helpers --------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return RawResponse(status, headers, body)


@contextlib.asynccontextmanager
async def connection(
    client: TestClient[Any, Any],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw(client: TestClient[Any, Any], request: bytes, *, head: bool = False) -> RawResponse:
    """Send `request` as it is on a fresh connection; read one response (bounded)."""
    async with connection(client) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return await read_response(reader, head=head)


def request_bytes(
    method: str, target: str | bytes, headers: dict[str, str], body: bytes = b""
) -> bytes:
    if isinstance(target, str):
        target = target.encode("utf-8")
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    return (
        method.encode()
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + head
        + b"\r\n"
        + body
    )


async def wait_closed_or_response(reader: asyncio.StreamReader) -> RawResponse | None:
    """A response, or None when the server closes the connection; bounded (TIMEOUT)."""
    try:
        return await read_response(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def assert_one_line_4xx(status: int, text: str, expected: int | None = None) -> None:
    assert 400 <= status < 500, (status, text)
    if expected is not None:
        assert status == expected, (status, text)
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), repr(text)


async def check(resp: Any, expected: int) -> str:
    """A gateway rejection: the status, a one-line reason, Tus-Resumable."""
    text: str = await resp.text()
    assert_one_line_4xx(resp.status, text, expected)
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    return text


def store(tmp_path: Path) -> Path:
    return tmp_path / "data" / "uploads"


def upload_count(tmp_path: Path) -> int:
    return len(list(store(tmp_path).glob("*.info")))


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
async def stored(client: TestClient[Any, Any]) -> str:
    """An upload of 100 bytes holding STORED: bad requests must leave it exactly so."""
    path = await create_upload(client, 100, **{"Upload-Metadata": "filename YS50eHQ="})
    assert (await patch(client, path, 0, STORED)).status == 204
    return path


async def assert_unchanged(client: TestClient[Any, Any], path: str) -> None:
    head = await client.head(path, headers=TUS)
    assert head.status == 200
    assert head.headers["Upload-Offset"] == str(len(STORED))
    assert head.headers["Upload-Length"] == "100"
    assert head.headers["Upload-Metadata"] == "filename YS50eHQ="
    assert await (await client.get(path)).read() == STORED


@pytest.fixture
def contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Runs the test with the working directory inside tmp_path, so that a path resolved
    relative to it would land where the check below sees it; afterwards every new file must be
    in the store."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = files_under(tmp_path)
    yield tmp_path
    created = files_under(tmp_path) - before
    outside = {p for p in created if store(tmp_path) not in p.parents and p != store(tmp_path)}
    assert not outside, f"files created outside the store: {sorted(outside)}"


BAD_NUMBERS = [
    "-1",
    "abc",
    "1e3",
    "1.0",
    "+12",
    "0x10",
    "1 2",
    "12abc",
    "1_000",
    str(2**63),  # one past the largest 63-bit value
    str(2**64 + 5),
    "9" * 19,  # 19 digits, still past 2^63-1
    "9" * 400,
    "9" * 5000,  # more digits than int() converts by default
]


# -- Tus-Resumable -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", [None, "", "0.2.2", "1.0", "1.0.0.0", "garbage", "1.0.0, 0.2.2"]
)
@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
async def test_missing_or_garbage_tus_resumable_is_412(
    client: TestClient[Any, Any], stored: str, tmp_path: Path, method: str, version: str | None
) -> None:
    headers = {
        "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": "10",
        "Upload-Length": "5",
    }
    if version is not None:
        headers["Tus-Resumable"] = version
    path = "/files/" if method == "POST" else stored
    count = upload_count(tmp_path)
    resp = await client.request(method, path, headers=headers, data=io.BytesIO(b"xyz"))
    assert resp.status == 412
    assert resp.headers["Tus-Version"] == "1.0.0"
    if method != "HEAD":
        await check(resp, 412)
    assert upload_count(tmp_path) == count
    await assert_unchanged(client, stored)


# -- Upload-Length / Upload-Offset / Upload-Defer-Length ---------------------------------------


@pytest.mark.parametrize("value", [*BAD_NUMBERS, ""])
async def test_bad_upload_length_on_post_is_400(
    client: TestClient[Any, Any], tmp_path: Path, value: str
) -> None:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": value})
    await check(resp, 400)
    assert upload_count(tmp_path) == 0


@pytest.mark.parametrize("value", ["١٢", "１２", "½"])
async def test_non_ascii_digits_in_upload_length_are_400(
    client: TestClient[Any, Any], tmp_path: Path, value: str
) -> None:
    resp = await raw(client, request_bytes("POST", "/files/", {**TUS, "Upload-Length": value}))
    assert_one_line_4xx(resp.status, resp.text, 400)
    assert upload_count(tmp_path) == 0


async def test_upload_length_around_ows_is_the_number(client: TestClient[Any, Any]) -> None:
    """RFC 9110 §5.5: whitespace around a field value is not part of it, so `Upload-Length:
    " 12 "` is 12 (a parser could not tell it from "12" anyway)."""
    resp = await raw(
        client,
        b"POST /files/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Tus-Resumable: 1.0.0\r\nUpload-Length:   12  \r\n\r\n",
    )
    assert resp.status == 201
    path = "/files/" + resp.headers["location"].rsplit("/", 1)[1]
    assert (await client.head(path, headers=TUS)).headers["Upload-Length"] == "12"


async def test_upload_length_of_2_63_minus_1_is_over_max_size(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": str(2**63 - 1)})
    await check(resp, 413)
    assert upload_count(tmp_path) == 0


@pytest.mark.parametrize("value", [*BAD_NUMBERS, "", None])
async def test_bad_upload_offset_on_patch_is_400(
    client: TestClient[Any, Any], stored: str, value: str | None
) -> None:
    headers = dict(OCTET)
    if value is not None:
        headers["Upload-Offset"] = value
    resp = await client.patch(stored, headers=headers, data=io.BytesIO(b"abc"))
    await check(resp, 400)
    await assert_unchanged(client, stored)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, ""])
async def test_bad_deferred_length_on_patch_is_400(
    client: TestClient[Any, Any], value: str
) -> None:
    path = await create_upload(client, None)
    assert (await patch(client, path, 0, b"abc")).status == 204
    resp = await patch(client, path, 3, b"def", **{"Upload-Length": value})
    await check(resp, 400)
    head = await client.head(path, headers=TUS)
    assert head.headers["Upload-Defer-Length"] == "1"
    assert head.headers["Upload-Offset"] == "3"


@pytest.mark.parametrize(
    "headers",
    [
        {"Upload-Defer-Length": "0"},
        {"Upload-Defer-Length": "2"},
        {"Upload-Defer-Length": "true"},
        {"Upload-Defer-Length": ""},
        {"Upload-Defer-Length": "1", "Upload-Length": "10"},
        {},  # neither
    ],
)
async def test_bad_defer_length_is_400(
    client: TestClient[Any, Any], tmp_path: Path, headers: dict[str, str]
) -> None:
    await check(await client.post("/files/", headers={**TUS, **headers}), 400)
    assert upload_count(tmp_path) == 0


# -- Upload-Metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "filename !!!notbase64",
        "filename d29ybGQ",  # unpadded
        "filename d29y bGQ=",  # three parts
        "filename  d29ybGQ=",  # two spaces: an empty part
        "filename\td29ybGQ=",  # a tab is not the separator: the key is not a token
        "a YQ==,a Yg==",  # duplicate key
        ",a YQ==",  # empty key
        "a YQ==,",
        "a YQ==,,b Yg==",
        "ke/y YQ==",  # not a token
        'ke"y YQ==',
        "a " + base64.b64encode(os.urandom(20_000)).decode(),  # longer than max_metadata_size
    ],
)
async def test_malformed_metadata_is_400(
    client: TestClient[Any, Any], tmp_path: Path, value: str
) -> None:
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Length": "3", "Upload-Metadata": value}
    )
    await check(resp, 400)
    assert upload_count(tmp_path) == 0


@pytest.mark.parametrize("value", ["kéy YQ==".encode(), b"k\xe9y YQ==", b"k\xff\xfe YQ=="])
async def test_non_ascii_metadata_key_is_400(
    client: TestClient[Any, Any], tmp_path: Path, value: bytes
) -> None:
    request = (
        b"POST /files/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\n"
        b"Upload-Length: 3\r\nUpload-Metadata: " + value + b"\r\n\r\n"
    )
    resp = await raw(client, request)
    assert_one_line_4xx(resp.status, resp.text, 400)
    assert upload_count(tmp_path) == 0


async def test_a_comma_in_a_key_makes_two_keys(client: TestClient[Any, Any]) -> None:
    """A key "with a comma" cannot be written: the comma separates pairs, so `a,b YQ==` is the
    key `a` without a value and the key `b` -- valid, and echoed exactly."""
    path = await create_upload(client, 3, **{"Upload-Metadata": "a,b YQ=="})
    assert (await client.head(path, headers=TUS)).headers["Upload-Metadata"] == "a,b YQ=="


# -- Upload-Checksum ---------------------------------------------------------------------------

SHA1 = base64.b64encode(hashlib.sha1(b"abc").digest()).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sha1", 400),
        ("sha1 ", 400),
        (f"sha1{SHA1}", 400),
        ("sha1 !!!!", 400),
        ("sha1 AAAA", 400),  # base64, but not 20 bytes
        (f"sha1 {SHA1} extra", 400),
        (f"sha1:{SHA1}", 400),
        (f"sha3 {SHA1}", 400),  # unknown algorithms: 400 too (SPEC §3.1)
        (f"SHA-1 {SHA1}", 400),
        (f"foo {SHA1}", 400),
    ],
)
async def test_malformed_checksum_on_patch_is_400(
    client: TestClient[Any, Any], stored: str, value: str, expected: int
) -> None:
    resp = await patch(client, stored, 10, b"abc", **{"Upload-Checksum": value})
    await check(resp, expected)
    await assert_unchanged(client, stored)


async def test_malformed_checksum_on_creation_with_upload_creates_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """The POST is refused for a header that can be judged before the body: no upload may be
    left behind (the client got no Location, so nobody could ever resume or delete it)."""
    resp = await client.post(
        "/files/",
        data=io.BytesIO(b"abc"),
        headers={**OCTET, "Upload-Length": "3", "Upload-Checksum": "sha1 !!!!"},
    )
    await check(resp, 400)
    assert upload_count(tmp_path) == 0


async def test_creation_with_upload_longer_than_upload_length_creates_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """Content-Length > Upload-Length is known before one byte: 413 and no orphan upload."""
    resp = await client.post(
        "/files/", data=io.BytesIO(b"0123456789"), headers={**OCTET, "Upload-Length": "5"}
    )
    await check(resp, 413)
    assert upload_count(tmp_path) == 0


async def test_creation_with_upload_of_wrong_content_type_creates_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    resp = await client.post(
        "/files/",
        data=io.BytesIO(b"abc"),
        headers={**TUS, "Upload-Length": "3", "Content-Type": "text/plain"},
    )
    await check(resp, 415)
    assert upload_count(tmp_path) == 0


# -- Upload-Concat -----------------------------------------------------------------------------


async def test_malformed_or_foreign_concat_is_rejected(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    partial = await create_upload(client, 3, **{"Upload-Concat": "partial"})
    plain = await create_upload(client, 3)
    partial_id = partial.rsplit("/", 1)[1]
    own = f"http://{client.host}:{client.port}"
    unknown = "/files/" + "0" * 32
    cases = [
        ("partial;", 400),
        ("Partial", 400),
        ("final", 400),
        ("final;", 400),
        ("final; ", 400),
        (f"finally;{partial}", 400),
        (f"final;http://evil.example{partial}", 400),  # another host
        (f"final;https://evil.example:{client.port}{partial}", 400),
        (f"final;{own}/other/{partial_id}", 400),  # another path
        (f"final;/other/{partial_id}", 400),
        (f"final;/files/../files/{partial_id}", 404),
        (f"final;/files/{partial_id}/../x", 404),
        (f"final;{plain}", 400),  # not a partial upload
        (f"final;{partial} {plain}", 400),
        (f"final;{unknown}", 404),
        (f"final;{partial} /files/", 404),
    ]
    count = upload_count(tmp_path)
    for value, expected in cases:
        resp = await client.post("/files/", headers={**TUS, "Upload-Concat": value})
        text = await resp.text()
        assert resp.status == expected, (value, resp.status, text)
        assert_one_line_4xx(resp.status, text)
    # A final takes its length from its partials and takes no body.
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Concat": f"final;{partial}", "Upload-Length": "3"}
    )
    await check(resp, 400)
    resp = await client.post(
        "/files/", data=io.BytesIO(b"abc"), headers={**OCTET, "Upload-Concat": f"final;{partial}"}
    )
    await check(resp, 400)
    assert upload_count(tmp_path) == count


# -- odd ids and path traversal ----------------------------------------------------------------


def odd_targets(upload_id: str) -> list[bytes]:
    return [
        b"/files/../x",
        b"/files/%2e%2e%2fetc",
        b"/files/..%2F..%2Fetc%2Fpasswd",
        b"/files/..%5c..%5cetc%5cpasswd",
        b"/files/..",
        b"/files/%2e%2e",
        b"/files/.",
        b"/files/%2F",
        b"/files/%00",
        f"/files/{upload_id}%00".encode(),
        f"/files/{upload_id}%0A".encode(),  # `$` would match before a trailing newline
        f"/files/{upload_id}%0D%0A".encode(),
        f"/files/{upload_id.upper()}".encode(),  # ids are lowercase hex
        f"/files/{upload_id}0".encode(),  # too long
        f"/files/{upload_id[:-1]}".encode(),  # too short
        f"/files/{'a' * 5000}".encode(),
        f"/files/{upload_id}.info".encode(),
        f"/files/{upload_id}.bin".encode(),
        f"/files/{upload_id}/".encode(),
        b"/files/%C3%A9t%C3%A9",
        f"/files/{upload_id[:30]}%C3%A9".encode(),
    ]


@pytest.mark.parametrize("method", ["HEAD", "GET", "PATCH", "DELETE", "POST-override"])
async def test_odd_and_traversing_ids_are_404_and_touch_nothing(
    client: TestClient[Any, Any], stored: str, contained: Path, method: str
) -> None:
    upload_id = stored.rsplit("/", 1)[1]
    headers = {**OCTET, "Upload-Offset": "10", "Content-Length": "3"}
    verb = method
    if method == "POST-override":
        verb, headers["X-HTTP-Method-Override"] = "POST", "PATCH"
    for target in odd_targets(upload_id):
        body = b"abc" if verb in ("PATCH", "POST") else b""
        if not body:
            headers.pop("Content-Length", None)
        resp = await raw(client, request_bytes(verb, target, headers, body), head=verb == "HEAD")
        assert resp.status == 404, (target, resp.status, resp.text)
        if verb != "HEAD":
            assert resp.text.strip() and resp.text.count("\n") <= 1, resp.text
    # A request line with raw non-ASCII bytes is refused by the HTTP parser itself.
    resp = await raw(client, request_bytes(verb, "/files/été".encode(), dict(TUS)))
    assert 400 <= resp.status < 500
    await assert_unchanged(client, stored)


# -- bodies ------------------------------------------------------------------------------------


def patch_head(path: str, offset: int, *, length: int | None = None, **extra: str) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    return (
        f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"{framing}\r\n{lines}\r\n"
    ).encode()


async def test_bytes_past_content_length_are_not_part_of_the_upload(
    client: TestClient[Any, Any], stored: str
) -> None:
    """What follows the declared body is the next request on the connection (garbage here):
    the PATCH counts exactly Content-Length bytes, the garbage gets a 4xx or a closed socket."""
    async with connection(client) as (reader, writer):
        writer.write(patch_head(stored, 10, length=5) + b"ABCDE")
        await writer.drain()
        first = await read_response(reader)
        assert first.status == 204
        assert first.headers["upload-offset"] == "15"
        writer.write(b"FGHIJ-surplus-bytes\r\n\r\n")
        await writer.drain()
        second = await wait_closed_or_response(reader)
        assert second is None or 400 <= second.status < 500
    assert await offset_of(client, stored) == 15
    assert await (await client.get(stored)).read() == STORED + b"ABCDE"


async def test_surplus_in_the_same_segment_never_counts(
    client: TestClient[Any, Any], stored: str
) -> None:
    """Body and surplus in one write: aiohttp may refuse the whole segment; the upload then
    has either the 5 declared bytes (and the client saw a 204) or none of them -- never more."""
    async with connection(client) as (reader, writer):
        writer.write(patch_head(stored, 10, length=5) + b"ABCDEFGHIJ\r\n\r\n")
        await writer.drain()
        statuses = []
        for _ in range(2):
            resp = await wait_closed_or_response(reader)
            if resp is None:
                break
            statuses.append(resp.status)
    offset = await offset_of(client, stored)
    assert offset in (10, 15)
    assert (204 in statuses) == (offset == 15)
    assert all(s == 204 or 400 <= s < 500 for s in statuses), statuses
    assert await (await client.get(stored)).read() == (STORED + b"ABCDE")[:offset]


class RecordingLifecycle(Lifecycle):
    def __init__(self) -> None:
        self.completed_ids: list[str] = []

    async def completed(
        self, request: Any, info: UploadInfo, checksums: dict[str, str]
    ) -> Completion:
        self.completed_ids.append(info.id)
        return Completion()


async def test_chunked_body_past_upload_length_is_413_keeps_what_fits_and_completes(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """A chunked body cannot announce its length: the bytes up to Upload-Length are kept and the
    request ends with 413. Those bytes complete the upload -- which must then be completed like
    any other (the lifecycle hears it, so processing finalizes it): the client sees offset ==
    length on HEAD and will never send another byte."""
    lifecycle = RecordingLifecycle()
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})
    client = await aiohttp_client(create_app(settings, lifecycle=lifecycle))
    path = await create_upload(client, 10)
    assert (await patch(client, path, 0, b"0123")).status == 204

    async def body() -> AsyncIterator[bytes]:
        yield b"456"
        yield b"789-and-then-some"

    resp = await client.patch(path, data=body(), headers={**OCTET, "Upload-Offset": "4"})
    await check(resp, 413)
    assert await offset_of(client, path) == 10
    assert await (await client.get(path)).read() == b"0123456789"
    assert lifecycle.completed_ids == [path.rsplit("/", 1)[1]]


async def test_broken_chunked_encoding_keeps_what_arrived(make_client: ClientFactory) -> None:
    """A chunk-size line that is not hex, after a good chunk. aiohttp's C parser does not pass
    this error to the running request's body (its pure-Python parser does, and the gateway then
    answers 400 at once), so the request may only end by the idle timeout (408): kept short
    here. Either way: a 4xx or a closed connection, the good chunk kept, the upload free."""
    client = await make_client(server_idle_timeout=0.5)
    stored = await create_upload(client, 100, **{"Upload-Metadata": "filename YS50eHQ="})
    assert (await patch(client, stored, 0, STORED)).status == 204
    async with connection(client) as (reader, writer):
        writer.write(patch_head(stored, 10) + b"5\r\nABCDE\r\n")
        await writer.drain()
        for _ in range(POLL_ROUNDS):
            if await offset_of(client, stored) == 15:
                break
            await asyncio.sleep(POLL)
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        resp = await wait_closed_or_response(reader)
        assert resp is None or 400 <= resp.status < 500
    assert await offset_of(client, stored) == 15
    # The upload is free again: the client resumes at once.
    assert (await patch(client, stored, 15, b"FGHIJ")).status == 204
    assert await (await client.get(stored)).read() == STORED + b"ABCDEFGHIJ"


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 3\r\nTransfer-Encoding: chunked",
        "Content-Length: -3",
        "Content-Length: 3x",
        "Content-Length: 3\r\nContent-Length: 4",
        "Transfer-Encoding: gzip",
    ],
)
async def test_bad_framing_is_4xx(client: TestClient[Any, Any], stored: str, framing: str) -> None:
    request = (
        f"PATCH {stored} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 10\r\n{framing}\r\n\r\nabc"
    ).encode()
    async with connection(client) as (reader, writer):
        writer.write(request)
        await writer.drain()
        resp = await wait_closed_or_response(reader)
    assert resp is None or 400 <= resp.status < 500
    await assert_unchanged(client, stored)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/octet-stream",
        "application/offset+octet-streamx",
        "multipart/form-data; boundary=x",
        "application/offset",
    ],
)
async def test_patch_with_wrong_content_type_is_415(
    client: TestClient[Any, Any], stored: str, content_type: str | None
) -> None:
    headers = {**TUS, "Upload-Offset": "10"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = await client.patch(
        stored, data=io.BytesIO(b"abc"), headers=headers, skip_auto_headers=["Content-Type"]
    )
    await check(resp, 415)
    await assert_unchanged(client, stored)


# -- slow clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [0, 7])
async def test_slow_client_is_ended_and_keeps_what_it_sent(
    make_client: ClientFactory, sent: int
) -> None:
    """Headers (and maybe a few bytes), then silence: 408 or a closed connection within a
    bounded wait; what arrived is kept and the upload is free for the retry."""
    client = await make_client(server_idle_timeout=0.5)
    path = await create_upload(client, 100)
    async with connection(client) as (reader, writer):
        writer.write(patch_head(path, 0, length=100) + b"x" * sent)
        await writer.drain()
        resp = await wait_closed_or_response(reader)  # bounded by TIMEOUT, well past 0.5 s
        assert resp is None or resp.status == 408
        if resp is not None:
            assert_one_line_4xx(resp.status, resp.text, 408)
    assert await offset_of(client, path) == sent
    assert (await patch(client, path, sent, b"y" * (100 - sent))).status == 204
    assert await (await client.get(path)).read() == b"x" * sent + b"y" * (100 - sent)


async def test_slow_client_timeout_is_not_logged_as_an_unhandled_error(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle timeout is a known outcome with its own 408: it must not also leave an error
    with a traceback in the log (one per slow client would drown real failures)."""
    client = await make_client(server_idle_timeout=0.5)
    path = await create_upload(client, 100)
    with caplog.at_level(logging.WARNING):
        async with connection(client) as (reader, writer):
            writer.write(patch_head(path, 0, length=100) + b"x" * 7)
            await writer.drain()
            resp = await wait_closed_or_response(reader)
            assert resp is None or resp.status == 408
            with contextlib.suppress(ConnectionError):  # until the server is done with it
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def test_half_a_request_head_then_silence_is_disconnected(make_client: ClientFactory) -> None:
    """Slowloris: a request head that never ends holds a connection (and a file descriptor)
    until a timeout ends it; with `server_idle_timeout=0.5` that must happen well within the
    bounded wait here."""
    client = await make_client(server_idle_timeout=0.5)
    path = await create_upload(client, 100)
    async with connection(client) as (reader, writer):
        writer.write(
            f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n".encode()
        )
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), TIMEOUT)
        except TimeoutError:
            pytest.fail(f"the connection was still open after {TIMEOUT} s of silence")
        except ConnectionError:
            data = b""
        assert data == b"" or data.startswith((b"HTTP/1.1 408", b"HTTP/1.0 408"))


# -- methods and header sizes ------------------------------------------------------------------


@pytest.mark.parametrize("override", ["FOO", "TRACE", "CONNECT", "PUT", "PATCHX", "X" * 1000])
async def test_unknown_method_override_is_405(
    client: TestClient[Any, Any], stored: str, tmp_path: Path, override: str
) -> None:
    count = upload_count(tmp_path)
    for path in (stored, "/files/"):
        resp = await client.post(
            path,
            data=io.BytesIO(b"abc"),
            headers={
                **OCTET,
                "X-HTTP-Method-Override": override,
                "Upload-Offset": "10",
                "Upload-Length": "3",
            },
        )
        text = await check(resp, 405)
        assert len(text) < 200
    assert upload_count(tmp_path) == count
    await assert_unchanged(client, stored)


async def test_override_to_patch_on_the_collection_is_405(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/files/", headers={**OCTET, "X-HTTP-Method-Override": "PATCH"})
    await check(resp, 405)


@pytest.mark.parametrize(
    "request_head",
    [
        b"HEAD /files/ID HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nX-Big: "
        + b"a" * 100_000
        + b"\r\n",
        b"HEAD /files/ID HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)),
        b"GET /files/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n",
        b"POST /files/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 3\r\n"
        b"Upload-Metadata: a " + base64.b64encode(b"m" * 45_000) + b"\r\n",
    ],
    ids=["one-100KB-header", "1000-headers", "20KB-url", "60KB-metadata"],
)
async def test_huge_headers_are_4xx(
    client: TestClient[Any, Any], stored: str, tmp_path: Path, request_head: bytes
) -> None:
    count = upload_count(tmp_path)
    request = request_head.replace(b"/files/ID", stored.encode()) + b"Connection: close\r\n\r\n"
    async with connection(client) as (reader, writer):
        writer.write(request)
        await writer.drain()
        resp = await wait_closed_or_response(reader)
    assert resp is None or 400 <= resp.status < 500, resp
    assert upload_count(tmp_path) == count
    await assert_unchanged(client, stored)


@pytest.mark.parametrize(
    "value",
    [
        "bytes=0-" + "9" * 5000,
        "bytes=" + "9" * 5000 + "-",
        "bytes=-" + "9" * 5000,
        "bytes=5-3",
        "bytes=-0",
        "bytes=99999999999999999999-",
        "bytes=0-1,3-4",
        "pages=1-2",
        "bytes=٣-٤",
    ],
)
async def test_odd_ranges_are_never_a_500(
    client: TestClient[Any, Any], stored: str, value: str
) -> None:
    resp = await raw(client, request_bytes("GET", stored, {"Range": value}))
    assert resp.status in (200, 206, 416), (resp.status, resp.text)
    if resp.status == 200:
        assert resp.body == STORED
    if resp.status == 206:
        first, last = map(int, resp.headers["content-range"].split(" ")[1].split("/")[0].split("-"))
        assert resp.body == STORED[first : last + 1] and resp.body
