"""PATCH /files/{id} -- append bytes at Upload-Offset (core, checksum, creation-defer-length)."""

from __future__ import annotations

from aiohttp import web

from gateway import errors
from gateway.locks import LockBusy
from gateway.store.base import UploadInfo
from gateway.tus.context import TUS, TusContext
from gateway.tus.headers import parse_int_header
from gateway.tus.respond import completion_response
from gateway.tus.write import Interruptible, check_content_type, receive_body

__all__ = ["handle_patch"]


async def _declare_length_if_sent(
    ctx: TusContext, request: web.Request, info: UploadInfo
) -> UploadInfo:
    """creation-defer-length: the length may arrive with any PATCH, once."""
    if "Upload-Length" not in request.headers:
        return info
    length = parse_int_header(request.headers["Upload-Length"], errors.INVALID_LENGTH, "Upload-Length")
    if not info.size_is_deferred:
        if length == info.size:
            return info
        raise errors.LENGTH_ALREADY_SET.error()
    if length > ctx.settings.server_max_size:
        raise errors.MAX_SIZE_EXCEEDED.error(f"{length} > {ctx.settings.server_max_size}")
    if length < info.offset:
        raise errors.LENGTH_TOO_SMALL.error(f"offset is {info.offset}")
    assert ctx.store.length_deferrer is not None
    return await ctx.store.length_deferrer.declare_length(info.id, length)


async def handle_patch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    upload_id = ctx.upload_id(request)
    check_content_type(request)
    offset = parse_int_header(request.headers.get("Upload-Offset"), errors.INVALID_OFFSET, "Upload-Offset")
    interruptible = Interruptible()
    try:
        async with ctx.locker.hold(upload_id, interruptible):
            info = await ctx.store.core.get_info(upload_id)
            if info.is_final:
                # "The Server MUST respond with 403 Forbidden to PATCH requests against a final upload"
                raise errors.MODIFY_FINAL.error()
            if offset != info.offset:
                # "If the offsets do not match, the Server MUST respond with 409 Conflict
                # without modifying the upload resource."
                raise errors.OFFSET_MISMATCH.error(f"upload is at {info.offset}, not {offset}")
            info = await _declare_length_if_sent(ctx, request, info)
            if info.is_complete and request.content_length not in (None, 0):
                raise errors.SIZE_EXCEEDED.error("the upload is already complete")
            with ctx.owner_slots.held(info.owner):  # 429 past the limit, before a byte is read
                outcome = await receive_body(ctx, request, info, interruptible)
    except LockBusy:
        raise errors.LOCKED.error() from None
    info = outcome.info
    headers = {"Upload-Offset": str(info.offset), **ctx.upload_headers(info)}
    completion = await outcome.finish(ctx, request)
    return completion_response(204, headers, completion)
