"""DELETE /files/{id} -- termination. A running PATCH for the upload is ended first."""

from __future__ import annotations

from aiohttp import web

from gateway import errors
from gateway.locks import LockBusy
from gateway.tus.context import TUS
from gateway.tus.headers import TUS_VERSION

__all__ = ["handle_delete"]


async def handle_delete(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    upload_id = ctx.upload_id(request)
    if ctx.store.terminater is None:
        raise errors.METHOD_NOT_ALLOWED.error("this store does not support termination")
    try:
        async with ctx.locker.hold(upload_id):
            info = await ctx.store.core.get_info(upload_id)
            await ctx.store.terminater.terminate(upload_id)
    except LockBusy:
        raise errors.LOCKED.error() from None
    ctx.digests.forget(upload_id)
    await ctx.lifecycle.terminated(info)
    return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})
