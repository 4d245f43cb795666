"""HEAD /files/{id} -- where an upload stands."""

from __future__ import annotations

from aiohttp import web

from gateway.tus.concat import assemble_if_ready
from gateway.tus.context import TUS, upload_url

__all__ = ["handle_head"]


async def handle_head(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    info = await ctx.store.core.get_info(ctx.upload_id(request))
    if info.is_final and not info.assembled:
        info = await assemble_if_ready(ctx, info.id)
    # "The Server MUST prevent the client and/or proxies from caching the response"
    headers = {**ctx.upload_headers(info), "Cache-Control": "no-store"}
    if info.is_final:
        urls = " ".join(upload_url(request, ctx.settings, p) for p in info.partial_uploads)
        headers["Upload-Concat"] = f"final;{urls}"
    elif info.is_partial:
        headers["Upload-Concat"] = "partial"
    # "the Server MUST NOT include the Upload-Offset header" for an unfinished final upload
    if info.assembled:
        headers["Upload-Offset"] = str(info.offset)
    if info.size is not None:
        headers["Upload-Length"] = str(info.size)
    elif not info.is_final:
        headers["Upload-Defer-Length"] = "1"
    if info.metadata_raw is not None:
        headers["Upload-Metadata"] = info.metadata_raw
    return web.Response(status=200, headers=headers)
