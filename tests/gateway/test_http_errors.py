"""Requests aiohttp refuses before any handler runs still get a one-line reason (SPEC §8).

The gateway is served the way `tusgate serve` serves it (gateway.cli.run_gateway's runner), on
a real socket; the requests are raw bytes, since no HTTP client sends them malformed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.http_errors import OneLineErrorRunner, one_line
from gateway.settings import load_settings


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})
    runner = OneLineErrorRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def exchange(port: int, raw: bytes) -> tuple[str, str]:
    """(status line, body) of the answer to `raw`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after an error
    finally:
        writer.close()
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return head.splitlines()[0], body


@pytest.mark.parametrize(
    "raw",
    [
        b"GE\x01T /files/ HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad method
        b"GET /files/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",  # a header without a colon
        b"PATCH /files/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /files/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["method", "header", "content-length", "header-too-long"],
)
async def test_unparseable_requests_get_one_line(port: int, raw: bytes) -> None:
    status, body = await exchange(port, raw)
    assert re.fullmatch(r"HTTP/1\.[01] 4\d\d .+", status), status
    assert body.endswith("\n") and body.count("\n") == 1, repr(body)
    code = status.split()[1]
    assert body.startswith(f"{code} "), body
    assert len(body) <= 201


async def test_a_good_request_on_the_same_runner_is_unaffected(port: int) -> None:
    status, _ = await exchange(port, b"OPTIONS /files/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status in ("HTTP/1.1 204 No Content", "HTTP/1.1 200 OK")


def test_one_line_keeps_the_first_line_and_hides_server_errors() -> None:
    assert one_line(400, "Bad method:\n\n  b'GE\\x01T'\n    ^") == "400 Bad Request: Bad method"
    assert one_line(500, "Traceback ...\nsecret") == "500 Internal Server Error"
    assert one_line(431, None) == "431 Request Header Fields Too Large"
