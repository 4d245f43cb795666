"""OPTIONS /files/ -- what this server can do. It ignores Tus-Resumable, as the protocol says."""

from __future__ import annotations

from aiohttp import web

from gateway.tus.context import TUS
from gateway.tus.headers import CHECKSUM_ALGORITHMS, TUS_VERSION

__all__ = ["handle_options"]


async def handle_options(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    expiration = ctx.settings.store_expiration > 0
    headers = {
        "Tus-Resumable": TUS_VERSION,
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": ",".join(ctx.store.extensions(expiration=expiration)),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
    }
    if ctx.settings.server_max_size:
        headers["Tus-Max-Size"] = str(ctx.settings.server_max_size)
    return web.Response(status=204, headers=headers)
