"""What every TUS handler shares: the settings, the store, the locker and the lifecycle hooks.

It lives in the app under `TUS` (a typed AppKey) and is built once by `create_app`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.lifecycle import Lifecycle
from gateway.limits import OwnerSlots
from gateway.locks import Locker
from gateway.settings import Settings
from gateway.store.base import StoreComposer, UploadInfo
from gateway.tus.digests import RunningDigests
from gateway.tus.headers import TUS_VERSION, valid_upload_id

__all__ = ["TUS", "TusContext", "upload_url"]


@dataclass
class TusContext:
    settings: Settings
    store: StoreComposer
    locker: Locker
    lifecycle: Lifecycle
    digests: RunningDigests = field(default_factory=RunningDigests)
    owner_slots: OwnerSlots = field(default_factory=OwnerSlots)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # One thread: pieces of one body must be hashed in order, and hashing is cheap enough
    # that one core's worth serves every request.
    hash_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tusgate-hash")
    )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run work that outlives its request; kept referenced until done (asyncio docs)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    @property
    def base_path(self) -> str:
        return str(self.settings.server_base_path)

    def expires_at(self, info: UploadInfo) -> float | None:
        return info.expires_at(self.settings.store_expiration)

    def upload_headers(self, info: UploadInfo) -> dict[str, str]:
        """Headers that describe an upload's state (HEAD, and after PATCH/POST)."""
        headers = {"Tus-Resumable": TUS_VERSION}
        expires = self.expires_at(info)
        if expires is not None:
            headers["Upload-Expires"] = formatdate(expires, usegmt=True)
        return headers

    def upload_id(self, request: web.Request) -> str:
        """The id from the URL, validated before anything touches storage (404 otherwise)."""
        upload_id = request.match_info.get("upload_id", "")
        if not valid_upload_id(upload_id):
            raise errors.NOT_FOUND.error()
        return upload_id


TUS: web.AppKey[TusContext] = web.AppKey("tus", TusContext)


def _forwarded(request: web.Request) -> tuple[str | None, str | None]:
    """(proto, host) from `Forwarded` (RFC 7239), else from X-Forwarded-Proto/-Host."""
    proto = host = None
    forwarded = request.headers.get("Forwarded")
    if forwarded:
        first = forwarded.split(",")[0]
        for part in first.split(";"):
            name, _, value = part.strip().partition("=")
            value = value.strip('"')
            if name.lower() == "proto" and value in ("http", "https"):
                proto = value
            elif name.lower() == "host" and value:
                host = value
    proto = proto or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or None
    host = host or request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or None
    return proto, host


def base_url(request: web.Request, settings: Settings) -> str:
    """The absolute URL of this server as the client sees it."""
    proto, host = (None, None)
    if settings.server_behind_proxy:
        proto, host = _forwarded(request)
    if proto not in (None, "http", "https"):
        proto = None
    return f"{proto or request.scheme}://{host or request.host}"


def upload_url(request: web.Request, settings: Settings, upload_id: str, suffix: str = "") -> str:
    return f"{base_url(request, settings)}{settings.server_base_path}{upload_id}{suffix}"
