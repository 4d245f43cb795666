"""Each configured check, end to end: a veto is a 422 problem with its code, nothing delivered."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import MakeSystem, sha256

HOOK = """
import json, sys
facts = json.load(sys.stdin)
if "veto" in (facts["filename"] or ""):
    print(f"{facts['owner']} may not upload {facts['filename']} ({facts['sniffed_type']})")
    sys.exit(1)
"""


async def problem(response: Any) -> dict[str, Any]:
    assert response.status == 422, await response.text()
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type="application/problem+json")
    return body


async def test_every_check_can_veto(make_system: MakeSystem, tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    system = await make_system(
        checks_max_size=1024 * 1024,
        checks_deny_types="application/x-msdownload, application/x-executable",
        checks_hook_command=f"{sys.executable} {hook}",
    )
    cases = [
        (os.urandom(1024 * 1024 + 1), {"filename": "big.bin"}, "too_large"),
        (
            b"MZ\x90\x00" + os.urandom(2000),
            {"filename": "cat.png", "filetype": "image/png"},
            "type_not_allowed",
        ),
        (
            b"hello",
            {"filename": "a.txt", "checksum": "sha256 " + sha256(b"other")},
            "checksum_mismatch",
        ),
        (b"hello", {"filename": "a.txt", "checksum": "crc32 abc"}, "checksum_invalid"),
        (b"%PDF-1.7", {"filename": "veto.pdf"}, "vetoed"),
    ]
    for data, meta, code in cases:
        path, response = await system.upload(data, **meta)
        body = await problem(response)
        assert body["code"] == code, body
        assert body["upload_id"] == path.rsplit("/", 1)[1] and body["retryable"] is False
        status = await system.wait_state(path, "failed", timeout=5)
        assert status["error"]["code"] == code
    assert body["detail"] == "anonymous may not upload veto.pdf (application/pdf)"
    assert system.graph.files() == {}
    # A file that passes every check still goes through.
    data = b"%PDF-1.7 fine"
    path, response = await system.upload(
        data, filename="fine.pdf", checksum="sha256 " + sha256(data)
    )
    assert response.status == 204, await response.text()
    assert [f.sha256 for f in system.graph.files().values()] == [sha256(data)]


async def test_allow_list_judges_content_and_declared_type(make_system: MakeSystem) -> None:
    system = await make_system("local", checks_allow_types="image/*, text/csv")
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(100)
    for data, meta, status in [
        (png, {"filename": "a.png"}, 204),
        (png, {"filename": "a.png", "filetype": "image/png"}, 204),
        (b"a,b\n1,2\n", {"filename": "t.csv", "filetype": "text/csv"}, 204),
        (b"%PDF-1.7", {"filename": "x.png", "filetype": "image/png"}, 422),  # content says no
        (png, {"filename": "x.exe", "filetype": "application/octet-stream"}, 422),  # declared
        (b"just text", {"filename": "x.txt"}, 422),
    ]:
        _, response = await system.upload(data, **meta)
        assert response.status == status, (meta, await response.text())
    assert len(system.delivered_files()) == 3


@pytest.fixture
async def hook_url() -> AsyncIterator[str]:
    async def check(request: web.Request) -> web.Response:
        facts = await request.json()
        if facts["size"] > 10:
            return web.json_response(
                {"reason": f"{facts['filename']} is too long for us"}, status=403
            )
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", check)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/hook"))
    await server.close()


async def test_http_hook_can_veto(make_system: MakeSystem, hook_url: str) -> None:
    system = await make_system("local", checks_hook_url=hook_url)
    _, response = await system.upload(b"short", filename="ok.txt")
    assert response.status == 204
    _, response = await system.upload(b"far too long", filename="long.txt")
    body = await problem(response)
    assert (body["code"], body["detail"]) == ("vetoed", "long.txt is too long for us")
    assert [p.name for p in system.delivered_files()] == ["ok.txt"]
