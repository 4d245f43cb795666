"""Fixtures for gateway tests: an app on the filesystem store, served on a real socket."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.settings import Settings, load_settings
from gateway.tus.context import TUS as TUS_KEY
from gateway.tus.context import TusContext

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})


@pytest.fixture
async def make_client(aiohttp_client: Any, tmp_path: Path) -> ClientFactory:
    """make_client(**setting_overrides) -> a TestClient on a real socket."""

    async def factory(**overrides: Any) -> TestClient[Any, Any]:
        base = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})
        return await aiohttp_client(create_app(base.replace(**overrides)))

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client()


async def create_upload(client: TestClient[Any, Any], size: int | None, **headers: str) -> str:
    """POST an upload; returns its path (/files/<id>)."""
    hdrs = {**TUS, **headers}
    if size is None:
        hdrs["Upload-Defer-Length"] = "1"
    else:
        hdrs["Upload-Length"] = str(size)
    resp = await client.post("/files/", headers=hdrs)
    assert resp.status == 201, await resp.text()
    location = resp.headers["Location"]
    return "/files/" + location.rsplit("/", 1)[1]


async def patch(client: TestClient[Any, Any], path: str, offset: int, body: bytes, **headers: str) -> Any:
    # BytesIO: aiohttp warns about large raw bytes bodies (they are sent in one go).
    return await client.patch(
        path, data=io.BytesIO(body), headers={**OCTET, "Upload-Offset": str(offset), **headers}
    )


async def offset_of(client: TestClient[Any, Any], path: str) -> int:
    resp = await client.head(path, headers=TUS)
    assert resp.status == 200
    return int(resp.headers["Upload-Offset"])


def tus_context(client: TestClient[Any, Any]) -> TusContext:
    return client.app[TUS_KEY]
