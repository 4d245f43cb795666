"""UrlByteSource against a local aiohttp server on 127.0.0.1 (real sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from processing.sources import ByteSource, SourceError, read_range
from processing.sources_url import UrlByteSource, UrlSourceSettings
from processing.ssrf import AddressPolicy

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB

ServerFactory = Callable[..., Awaitable[TestServer]]


class Origin:
    """The test server's state: the resource, and what was asked and sent."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: Counter[str] = Counter()
        self.ranges: list[str | None] = []
        self.sent: Counter[str] = Counter()
        self.finished: dict[str, asyncio.Event] = {}
        self.fail_first = 0  # /flaky answers 503 this many times
        self.break_next_range = False  # the next 206 body is cut in the middle

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'

    def done(self, name: str) -> asyncio.Event:
        return self.finished.setdefault(name, asyncio.Event())

    def app(self, file_path: Path) -> web.Application:
        app = web.Application()
        app.router.add_get("/ranged/{name}", self.ranged)
        self.file_path = file_path
        app.router.add_get("/file/{name}", self.file)
        app.router.add_get("/plain/{name}", self.plain)
        app.router.add_get("/chunked/{name}", self.chunked)
        app.router.add_get("/declared-big", self.declared_big)
        app.router.add_get("/grow", self.grow)
        app.router.add_get("/flaky", self.flaky)
        app.router.add_get("/always-503", self.always_503)
        app.router.add_get("/missing", self.missing)
        return app

    async def ranged(self, request: web.Request) -> web.StreamResponse:
        """Range + If-Range by hand (RFC 9110 §14), with a strong ETag."""
        self.requests["ranged"] += 1
        header = request.headers.get("Range")
        self.ranges.append(header)
        base = {"Accept-Ranges": "bytes", "ETag": self.etag, "Content-Type": "text/csv"}
        if_range = request.headers.get("If-Range")
        if header is None or (if_range is not None and if_range != self.etag):
            return web.Response(body=self.data, headers=base)
        first_text, _, last_text = header.removeprefix("bytes=").partition("-")
        first, last = int(first_text), min(int(last_text), len(self.data) - 1)
        if first >= len(self.data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(self.data)}"})
        body = self.data[first : last + 1]
        response = web.StreamResponse(status=206, headers=base)
        response.headers["Content-Range"] = f"bytes {first}-{last}/{len(self.data)}"
        response.content_length = len(body)
        await response.prepare(request)
        if self.break_next_range:
            self.break_next_range = False
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-body
            return response
        await response.write(body)
        await response.write_eof()
        return response

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.requests["file"] += 1
        self.ranges.append(request.headers.get("Range"))
        return web.FileResponse(self.file_path)

    async def plain(self, request: web.Request) -> web.Response:
        """No Accept-Ranges, a Content-Length and a download name."""
        self.requests["plain"] += 1
        return web.Response(
            body=self.data,
            content_type="application/pdf",
            headers={"Content-Disposition": 'attachment; filename="report 2024.pdf"'},
        )

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        """No length at all: chunked transfer coding."""
        self.requests["chunked"] += 1
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for offset in range(0, len(self.data), 100_000):
            await response.write(self.data[offset : offset + 100_000])
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, name: str, *, declared: int | None) -> Any:
        """Send up to 64 MiB, counting what the client let through; the headers first,
        then a short pause, as a server with a big body would."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if declared is None:
            response.enable_chunked_encoding()
        else:
            response.content_length = declared
        try:
            await response.prepare(request)
            await asyncio.sleep(0.05)
            chunk = b"z" * CHUNK
            while self.sent[name] < 64 * MiB:
                await response.write(chunk)
                self.sent[name] += len(chunk)
                await asyncio.sleep(0)
        except (ConnectionError, RuntimeError):
            pass  # the client went away: what was sent is counted
        finally:
            self.done(name).set()
        return response

    async def declared_big(self, request: web.Request) -> web.StreamResponse:
        self.requests["declared-big"] += 1
        return await self._stream(request, "declared-big", declared=64 * MiB)  # type: ignore[no-any-return]

    async def grow(self, request: web.Request) -> web.StreamResponse:
        self.requests["grow"] += 1
        return await self._stream(request, "grow", declared=None)  # type: ignore[no-any-return]

    async def flaky(self, request: web.Request) -> web.Response:
        self.requests["flaky"] += 1
        if self.requests["flaky"] <= self.fail_first:
            return web.Response(status=503, text="busy")
        return web.Response(body=self.data)

    async def always_503(self, request: web.Request) -> web.Response:
        self.requests["always-503"] += 1
        return web.Response(status=503, text="down")

    async def missing(self, request: web.Request) -> web.Response:
        self.requests["missing"] += 1
        return web.Response(status=404, text="nope")


DATA = os.urandom(2 * MiB + 4321)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def origin() -> Origin:
    return Origin(DATA)


@pytest.fixture
async def base_url(origin: Origin, aiohttp_server: ServerFactory, tmp_path: Path) -> str:
    path = tmp_path / "served.bin"
    path.write_bytes(origin.data)
    server = await aiohttp_server(origin.app(path))
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def settings(tmp_path: Path) -> UrlSourceSettings:
    """Loopback allowed (only 127.0.0.1), millisecond backoff, a spool dir of our own."""
    return UrlSourceSettings(
        max_size=8 * MiB,
        spool_dir=tmp_path / "spool",
        policy=AddressPolicy.from_config(allow_networks="127.0.0.1/32"),
        backoff_initial=0.01,
        backoff_max=0.05,
        chunk_size=64 * KiB,
    )


async def sha_of_ranges(source: ByteSource, fragment: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, source.size, fragment):
        digest.update(await read_range(source, offset, min(offset + fragment, source.size)))
    return digest.hexdigest()


async def read_whole(source: ByteSource) -> bytes:
    chunks = [chunk async for chunk in source.open_range(0, source.size)]
    assert all(0 < len(chunk) <= 64 * KiB for chunk in chunks)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("path", "mode"),
    [
        ("/ranged/data.csv", "range"),
        ("/file/served.bin", "range"),  # aiohttp's own FileResponse: ETag, Range, If-Range
        ("/plain/report.pdf", "spool"),
        ("/chunked/data.bin", "spool"),
    ],
)
async def test_full_and_ranged_reads_are_identical(
    base_url: str, settings: UrlSourceSettings, path: str, mode: str
) -> None:
    async with await UrlByteSource.open(base_url + path, settings) as source:
        assert source.mode == mode
        assert source.size == len(DATA)
        assert hashlib.sha256(await read_whole(source)).hexdigest() == SHA
        assert await sha_of_ranges(source, 320 * KiB + 3) == SHA
        # A retried fragment reads the same bytes again.
        assert await read_range(source, 1000, 5000) == DATA[1000:5000]
        assert source.sha256 == SHA  # known once every byte was read (in order)


async def test_range_mode_reads_by_range_requests_pinned_to_the_etag(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    async with await UrlByteSource.open(base_url + "/ranged/data.csv", settings) as source:
        assert source.content_type == "text/csv"
        assert source.etag == origin.etag
        assert source.filename == "data.csv"
        assert source.sha256 is None  # nothing read yet
        assert await read_range(source, 10, 20) == DATA[10:20]
    assert origin.ranges == [None, "bytes=10-19"]


async def test_spool_mode_hashes_while_downloading_and_cleans_up(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    assert settings.spool_dir is not None
    source = await UrlByteSource.open(base_url + "/plain/report.pdf", settings)
    try:
        assert source.sha256 == SHA  # before any read
        assert source.content_type == "application/pdf"
        assert source.filename == "report 2024.pdf"
        assert len(list(settings.spool_dir.iterdir())) == 1
        assert await read_range(source, 7, 70_000) == DATA[7:70_000]
    finally:
        await source.aclose()
    assert list(settings.spool_dir.iterdir()) == []
    assert origin.requests["plain"] == 1
    with pytest.raises(SourceError):
        await read_range(source, 0, 1)


async def test_spool_mode_can_be_forced(base_url: str, settings: UrlSourceSettings) -> None:
    forced = UrlSourceSettings(**{**settings.__dict__, "mode": "spool"})
    async with await UrlByteSource.open(base_url + "/ranged/data.csv", forced) as source:
        assert source.mode == "spool"
        assert source.sha256 == SHA


async def test_declared_length_over_the_limit_is_refused_before_the_body(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(base_url + "/declared-big", settings)
    assert (caught.value.code, caught.value.retryable) == ("too_large", False)
    await asyncio.wait_for(origin.done("declared-big").wait(), 5)
    # The server could push at most a few chunks into the closed connection: the 64 MiB
    # body was not downloaded, and nothing was spooled.
    assert origin.sent["declared-big"] < 1 * MiB
    assert origin.requests["declared-big"] == 1
    assert settings.spool_dir is not None
    assert not settings.spool_dir.exists()  # no spool file was even created


async def test_a_body_growing_past_the_limit_is_stopped(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    small = UrlSourceSettings(**{**settings.__dict__, "max_size": 1 * MiB})
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(base_url + "/grow", small)
    assert (caught.value.code, caught.value.retryable) == ("too_large", False)
    await asyncio.wait_for(origin.done("grow").wait(), 5)
    assert origin.sent["grow"] < 32 * MiB  # stopped long before the server's 64 MiB
    assert settings.spool_dir is not None
    assert list(settings.spool_dir.iterdir()) == []


async def test_5xx_is_retried_until_success(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    origin.fail_first = 2
    async with await UrlByteSource.open(base_url + "/flaky", settings) as source:
        assert source.sha256 == SHA
    assert origin.requests["flaky"] == 3


async def test_5xx_gives_up_after_three_retries(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(base_url + "/always-503", settings)
    assert (caught.value.code, caught.value.retryable) == ("source_http_503", True)
    assert origin.requests["always-503"] == 4


async def test_404_is_not_retried(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(base_url + "/missing?token=secret", settings)
    assert (caught.value.code, caught.value.retryable) == ("source_http_404", False)
    assert "secret" not in caught.value.message  # query strings may carry credentials
    assert origin.requests["missing"] == 1


async def test_connection_refused_is_retried_then_retryable(settings: UrlSourceSettings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SourceError) as caught:
        await UrlByteSource.open(f"http://127.0.0.1:{port}/x", settings)
    assert (caught.value.code, caught.value.retryable) == ("source_unavailable", True)


async def test_resource_changed_between_open_and_read_is_source_changed(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    async with await UrlByteSource.open(base_url + "/ranged/data.csv", settings) as source:
        assert await read_range(source, 0, 100) == DATA[:100]
        origin.data = os.urandom(len(DATA))  # same length, new ETag
        with pytest.raises(SourceError) as caught:
            await read_range(source, 100, 200)
    assert (caught.value.code, caught.value.retryable) == ("source_changed", False)


async def test_a_range_cut_mid_body_resumes_from_the_next_byte(
    base_url: str, settings: UrlSourceSettings, origin: Origin
) -> None:
    async with await UrlByteSource.open(base_url + "/ranged/data.csv", settings) as source:
        origin.break_next_range = True
        assert await read_range(source, 0, source.size) == DATA
        assert source.sha256 == SHA
    first, second = origin.ranges[1], origin.ranges[2]
    assert first == f"bytes=0-{len(DATA) - 1}"
    assert second is not None and second.endswith(f"-{len(DATA) - 1}")
    resumed_at = int(second.removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= len(DATA) // 2


async def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        UrlSourceSettings(retries=-1)
    with pytest.raises(ValueError):
        UrlSourceSettings(chunk_size=0)
    with pytest.raises(ValueError):
        UrlSourceSettings(mode="stream")  # type: ignore[arg-type]
