"""The checks: size, sniffing and the type policy, declared checksums, hooks."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from events.model import FileStorage
from gateway.settings import ConfigError, load_settings
from processing.config import build_pipeline, build_steps, validate_settings
from processing.errors import CheckFailed, HookUnavailable, ProcessingError, SourceUnavailable
from processing.job import Job
from processing.sources import FileSource
from processing.steps import (
    CommandHook,
    HttpHook,
    SizeLimit,
    SniffType,
    StepContext,
    TypePolicy,
    VerifyChecksum,
    parse_declared,
    parse_patterns,
    sniff,
)


def make_ctx(tmp_path: Path, data: bytes, **job: Any) -> StepContext:
    path = tmp_path / "staged.bin"
    path.write_bytes(data)
    values: dict[str, Any] = {
        "id": "ab" * 16,
        "kind": "upload",
        "owner": "alice",
        "size": len(data),
        "storage": FileStorage(path=str(path)),
    }
    values.update(job)
    return StepContext(job=Job(**values), source=FileSource(path))


# -- size -----------------------------------------------------------------------------------


async def test_size_limit(tmp_path: Path) -> None:
    assert await SizeLimit(10).run(make_ctx(tmp_path, b"x" * 10)) == "10 bytes (limit 10)"
    assert await SizeLimit(0).run(make_ctx(tmp_path, b"x" * 11)) == "11 bytes"
    with pytest.raises(CheckFailed) as info:
        await SizeLimit(10).run(make_ctx(tmp_path, b"x" * 11))
    assert (info.value.code, info.value.retryable) == ("too_large", False)


async def test_size_must_match_the_announced_size(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable):
        await SizeLimit().run(make_ctx(tmp_path, b"abc", size=4))


# -- sniffing -------------------------------------------------------------------------------


def zipped(*names: str, mimetype: str | None = None) -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if mimetype:
            archive.writestr(zipfile.ZipInfo("mimetype"), mimetype)
        for name in names:
            archive.writestr(name, b"<x/>")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"%PDF-1.7\n", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"GIF89a\x01\x00", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00", "video/mp4"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "image/heic"),
        (b"ID3\x04\x00", "audio/mpeg"),
        (b"\x1f\x8b\x08\x00", "application/gzip"),
        (b"MZ\x90\x00\x03", "application/x-msdownload"),
        (b"\x7fELF\x02\x01", "application/x-executable"),
        (b"#!/bin/sh\nrm -rf /\n", "text/x-shellscript"),
        (b"hello, world\n", "text/plain"),
        ("h\u00e9llo w\u00f6rld \u2603".encode(), "text/plain"),
        (b"\xef\xbb\xbfname,age\n", "text/plain"),
        (b"<!DOCTYPE html><html>", "text/html"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg">', "image/svg+xml"),
        (b'<?xml version="1.0"?><root/>', "application/xml"),
        (b"\x00\x01\x02\x03\xfe", "application/octet-stream"),
        (b"", "text/plain"),
        (
            zipped("word/document.xml", "[Content_Types].xml"),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (zipped("a.txt"), "application/zip"),
        (
            zipped("content.xml", mimetype="application/vnd.oasis.opendocument.text"),
            "application/vnd.oasis.opendocument.text",
        ),
        (b"x" * 257 + b"ustar\x0000", "application/x-tar"),
    ],
)
def test_sniff(head: bytes, expected: str) -> None:
    assert sniff(head[:8192], complete=len(head) <= 8192) == expected


def test_a_character_cut_by_the_sample_end_is_still_text() -> None:
    sample = ("\u00e9" * 5000).encode()[:8191]  # ends in the middle of a 2-byte character
    assert sniff(sample, complete=False) == "text/plain"
    assert sniff(sample, complete=True) == "application/octet-stream"


def test_type_patterns() -> None:
    assert parse_patterns(" image/*, Application/PDF ;x=1,") == ("image/*", "application/pdf")
    with pytest.raises(ValueError, match="pdf"):
        parse_patterns("pdf")


@pytest.mark.parametrize(
    ("allow", "deny", "sniffed", "declared", "ok"),
    [
        ("", "", "application/x-msdownload", None, True),
        ("", "application/x-msdownload", "application/x-msdownload", "image/png", False),
        ("", "application/x-msdownload", "image/png", "application/x-msdownload", False),
        ("image/*", "", "image/png", "image/png", True),
        ("image/*", "", "image/png", None, True),
        ("image/*", "", "application/pdf", "image/png", False),  # a PDF dressed as an image
        ("image/*", "", "image/png", "application/pdf", False),
        ("text/csv", "", "text/plain", "text/csv", True),  # text the sniffer cannot name
        ("application/json", "", "text/plain", "application/json", True),
        ("text/csv", "", "text/plain", None, False),
        ("text/csv", "", "application/octet-stream", "text/csv", False),
        ("*/*", "image/gif", "image/gif", None, False),
        ("image/*", "image/gif", "image/png", "image/png;charset=x", True),
    ],
)
def test_type_policy(allow: str, deny: str, sniffed: str, declared: str | None, ok: bool) -> None:
    policy = TypePolicy(parse_patterns(allow), parse_patterns(deny))
    if ok:
        policy.judge(sniffed, declared)
    else:
        with pytest.raises(CheckFailed) as info:
            policy.judge(sniffed, declared)
        assert info.value.code == "type_not_allowed"


async def test_sniff_step_records_the_type(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, b"%PDF-1.4 ...", declared_type="image/png")
    detail = await SniffType().run(ctx)
    assert ctx.facts["sniffed_type"] == "application/pdf"
    assert detail == "application/pdf (declared image/png)"
    with pytest.raises(CheckFailed, match="application/pdf"):
        await SniffType(TypePolicy(allow=("image/*",))).run(make_ctx(tmp_path, b"%PDF-1.4"))


# -- checksum -------------------------------------------------------------------------------

DATA = b"the quick brown fox" * 1000


@pytest.mark.parametrize(
    "declared",
    [
        "sha256 " + hashlib.sha256(DATA).hexdigest(),
        "sha256 " + hashlib.sha256(DATA).hexdigest().upper(),
        "sha256 " + base64.b64encode(hashlib.sha256(DATA).digest()).decode(),
        "SHA-256 " + base64.b64encode(hashlib.sha256(DATA).digest()).decode().rstrip("="),
        "md5 " + hashlib.md5(DATA).hexdigest(),
        "sha1 " + base64.b64encode(hashlib.sha1(DATA).digest()).decode(),
        "sha512 " + hashlib.sha512(DATA).hexdigest(),
    ],
)
async def test_declared_checksum_matches(tmp_path: Path, declared: str) -> None:
    seen: list[int] = []

    async def progress(done: int) -> None:
        seen.append(done)

    ctx = make_ctx(tmp_path, DATA, metadata={"checksum": declared})
    ctx.progress = progress
    assert (await VerifyChecksum().run(ctx)).endswith("matches")
    assert seen[-1] == len(DATA)


async def test_declared_checksum_mismatch(tmp_path: Path) -> None:
    declared = "sha256 " + hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(CheckFailed) as info:
        await VerifyChecksum().run(make_ctx(tmp_path, DATA, metadata={"checksum": declared}))
    assert (info.value.code, info.value.retryable) == ("checksum_mismatch", False)


@pytest.mark.parametrize(
    "declared", ["sha256", "crc32 abcd", "sha256 xyz!", "md5 " + "ab" * 10, "sha256 a b"]
)
def test_declared_checksum_invalid(declared: str) -> None:
    with pytest.raises(CheckFailed) as info:
        parse_declared(declared)
    assert info.value.code == "checksum_invalid"


async def test_no_declared_checksum_passes(tmp_path: Path) -> None:
    assert await VerifyChecksum().run(make_ctx(tmp_path, DATA)) == "no checksum declared"


# -- hooks ----------------------------------------------------------------------------------

HOOK = """
import json, sys
facts = json.load(sys.stdin)
if "veto" in (facts["filename"] or ""):
    print("files named veto are not welcome\\nsecond line")
    sys.exit(3)
if facts["filename"] == "crash":
    import os, signal; os.kill(os.getpid(), signal.SIGKILL)
if facts["filename"] == "slow":
    import time; time.sleep(5)
print("ok", facts["sniffed_type"], facts["size"])
"""


def command_hook(tmp_path: Path, timeout: float = 10.0) -> CommandHook:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    return CommandHook.from_command_line(f"{sys.executable} {script}", timeout)


async def test_command_hook_accepts(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, b"%PDF-", filename="a.pdf")
    ctx.facts["sniffed_type"] = "application/pdf"
    assert await command_hook(tmp_path).run(ctx) == "accepted: ok application/pdf 5"


async def test_command_hook_vetoes_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckFailed) as info:
        await command_hook(tmp_path).run(make_ctx(tmp_path, b"x", filename="veto.txt"))
    assert (info.value.code, info.value.message) == ("vetoed", "files named veto are not welcome")


@pytest.mark.parametrize("filename", ["crash", "slow"])
async def test_command_hook_that_cannot_answer_is_retryable(tmp_path: Path, filename: str) -> None:
    with pytest.raises(HookUnavailable) as info:
        await command_hook(tmp_path, timeout=1.0).run(make_ctx(tmp_path, b"x", filename=filename))
    assert info.value.retryable and info.value.code == "hook_unavailable"


async def test_command_hook_missing_program(tmp_path: Path) -> None:
    hook = CommandHook.from_command_line(str(tmp_path / "no-such-hook"), 5)
    with pytest.raises(HookUnavailable, match="cannot run"):
        await hook.run(make_ctx(tmp_path, b"x"))


async def test_command_hook_gets_no_tusgate_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUSGATE_GRAPH_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("OTHER_VAR", "visible")
    hook = CommandHook(
        (
            sys.executable,
            "-c",
            (
                "import os; print(os.environ.get('TUSGATE_GRAPH_CLIENT_SECRET'),"
                " os.environ.get('OTHER_VAR'))"
            ),
        )
    )
    assert await hook.run(make_ctx(tmp_path, b"x")) == "accepted: None visible"


@pytest.fixture
async def hook_server() -> AsyncIterator[tuple[TestServer, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        facts = await request.json()
        received.append(facts)
        name = facts["filename"]
        if name == "veto-json":
            return web.json_response({"reason": "not on a Friday"}, status=403)
        if name == "veto-text":
            return web.Response(status=422, text="too blurry\nmore")
        if name == "down":
            return web.Response(status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/check", handle)
    server = TestServer(app)
    await server.start_server()
    yield server, received
    await server.close()


async def test_http_hook(
    tmp_path: Path, hook_server: tuple[TestServer, list[dict[str, Any]]]
) -> None:
    server, received = hook_server
    hook = HttpHook(str(server.make_url("/check")), timeout=5)
    try:
        ctx = make_ctx(tmp_path, b"x", filename="fine.txt", metadata={"k": "v"})
        ctx.facts["sniffed_type"] = "text/plain"
        assert await hook.run(ctx) == "accepted (HTTP 200)"
        facts = received[0]
        assert facts["id"] == "ab" * 16 and facts["owner"] == "alice" and facts["size"] == 1
        assert facts["metadata"] == {"k": "v"} and facts["sniffed_type"] == "text/plain"
        assert facts["storage"]["kind"] == "file"
        for name, reason in (("veto-json", "not on a Friday"), ("veto-text", "too blurry")):
            with pytest.raises(CheckFailed) as info:
                await hook.run(make_ctx(tmp_path, b"x", filename=name))
            assert (info.value.code, info.value.message) == ("vetoed", reason)
        with pytest.raises(HookUnavailable):
            await hook.run(make_ctx(tmp_path, b"x", filename="down"))
    finally:
        await hook.aclose()


async def test_http_hook_unreachable(tmp_path: Path) -> None:
    hook = HttpHook("http://127.0.0.1:9/check", timeout=2)
    try:
        with pytest.raises(HookUnavailable):
            await hook.run(make_ctx(tmp_path, b"x"))
    finally:
        await hook.aclose()


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"checks_allow_types": "pdf"}, "checks_allow_types"),
        ({"checks_deny_types": "image/png, exe"}, "checks_deny_types"),
        ({"checks_hook_url": "ftp://x"}, "checks_hook_url"),
        ({"checks_hook_command": "x", "checks_hook_url": "http://x"}, "checks_hook_url"),
        ({"checks_hook_command": "'unclosed"}, "checks_hook_command"),
        ({"destination_path_template": "{owner}/{nope}"}, "destination_path_template"),
        ({"destination_kind": "onedrive", "graph_fragment_size": 400_000}, "graph_fragment_size"),
        ({"processing_backoff": "1,x"}, "processing_backoff"),
    ],
)
def test_invalid_processing_settings_name_the_key(
    tmp_path: Path, overrides: dict[str, Any], key: str
) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=key):
        validate_settings(settings.replace(**overrides))
    with pytest.raises(ConfigError, match=key):
        build_pipeline(settings.replace(**overrides))


def test_steps_from_settings(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    assert [s.name for s in build_steps(settings)] == ["size", "sniff", "checksum"]
    steps = build_steps(settings.replace(checks_hook_command="true", checks_max_size=5))
    assert [s.name for s in steps] == ["size", "sniff", "checksum", "hook"]
    assert isinstance(steps[0], SizeLimit) and steps[0].max_size == 5


def test_errors_say_what_the_worker_needs() -> None:
    assert CheckFailed("vetoed", "no").as_dict() == {
        "code": "vetoed",
        "message": "no",
        "retryable": False,
    }
    assert ProcessingError("x").retryable is False
    assert json.dumps(HookUnavailable("down").as_dict())
