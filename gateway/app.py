"""The aiohttp application: `create_app(settings)` wires store, locker, lifecycle and routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.cors import setup_cors
from gateway.errors import error_middleware
from gateway.expiry import run_sweeper
from gateway.lifecycle import Lifecycle
from gateway.locks import LocalLocker
from gateway.settings import Settings
from gateway.store.base import DataStore, StoreComposer
from gateway.store.filestore import FileStore
from gateway.tus.context import TUS, TusContext
from gateway.tus.routes import add_tus_routes

__all__ = ["create_app", "make_store"]

# Upload-Metadata may be large (many keys); aiohttp's default field limit is 8190 bytes.
MAX_FIELD_SIZE = 64 * 1024


def make_store(settings: Settings) -> DataStore:
    if settings.store_kind == "file":
        return FileStore(settings.uploads_dir, fsync=settings.store_fsync)
    raise NotImplementedError(f"store kind {settings.store_kind!r} is not available yet")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    settings: Settings,
    *,
    store: DataStore | None = None,
    lifecycle: Lifecycle | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware], handler_args={"max_field_size": MAX_FIELD_SIZE}
    )
    ctx = TusContext(
        settings=settings,
        store=StoreComposer(store or make_store(settings)),
        locker=LocalLocker(timeout=settings.server_lock_timeout),
        lifecycle=lifecycle or Lifecycle(),
    )
    app[TUS] = ctx
    setup_cors(app, settings.server_cors_origins)
    add_tus_routes(app, settings.server_base_path)
    app.router.add_get("/healthz", healthz)

    async def background(app: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(run_sweeper(ctx), name="expiry-sweeper")
        yield
        sweeper.cancel()
        for task in [sweeper, *ctx.background]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(background)
    return app
