"""POST /files/ -- creation, creation-with-upload, creation-defer-length, concatenation."""

from __future__ import annotations

import secrets

from aiohttp import web

from gateway import errors
from gateway.auth import request_owner
from gateway.locks import LockBusy
from gateway.store.base import InfoChange, UploadInfo
from gateway.tus.concat import assemble_if_ready, load_partials
from gateway.tus.context import TUS, TusContext, base_url, upload_url
from gateway.tus.headers import parse_checksum, parse_concat, parse_int_header, parse_metadata
from gateway.tus.respond import completion_response
from gateway.tus.write import Interruptible, check_content_type, finish_if_complete, receive_body

__all__ = ["handle_post"]


def new_upload_id() -> str:
    """128 random bits: unguessable, and validated by one simple pattern everywhere."""
    return secrets.token_hex(16)


def _requested_size(ctx: TusContext, request: web.Request, is_final: bool) -> int | None:
    length = request.headers.get("Upload-Length")
    defer = request.headers.get("Upload-Defer-Length")
    if is_final:
        if length is not None:
            # "The Client MUST NOT include the Upload-Length header in the final upload creation"
            raise errors.INVALID_LENGTH.error("a final upload takes its length from its partials")
        return None
    if defer is not None:
        if defer.strip() != "1" or ctx.store.length_deferrer is None:
            raise errors.INVALID_LENGTH.error("Upload-Defer-Length must be 1")
        if length is not None:
            raise errors.INVALID_LENGTH.error("Upload-Length and Upload-Defer-Length both given")
        return None
    size = parse_int_header(length, errors.INVALID_LENGTH, "Upload-Length")
    if size > ctx.settings.server_max_size:
        raise errors.MAX_SIZE_EXCEEDED.error(f"{size} > {ctx.settings.server_max_size}")
    return size


async def handle_post(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    metadata = parse_metadata(
        request.headers.get("Upload-Metadata"), ctx.settings.server_max_metadata_size
    )
    own_host = base_url(request, ctx.settings).split("://", 1)[1]
    is_partial, partial_ids = parse_concat(
        request.headers.get("Upload-Concat"), ctx.base_path, own_host
    )
    if (is_partial or partial_ids) and ctx.store.concater is None:
        raise errors.INVALID_CONCAT.error("this store does not support concatenation")
    size = _requested_size(ctx, request, is_final=bool(partial_ids))
    owner = request_owner(request)
    partials = await load_partials(ctx, partial_ids, owner) if partial_ids else []
    has_body = request.body_exists
    if has_body:
        # Everything about the body is checked before the upload exists: a refused POST
        # leaves nothing behind.
        check_content_type(request)
        if partial_ids:
            raise errors.INVALID_CONCAT.error("a final upload takes no body")
        if "Upload-Checksum" in request.headers:
            parse_checksum(request.headers["Upload-Checksum"])
        limit = size if size is not None else ctx.settings.server_max_size
        if request.content_length is not None and request.content_length > limit:
            raise errors.SIZE_EXCEEDED.error(f"{request.content_length} bytes offered, {limit} allowed")
        with ctx.owner_slots.held(owner):  # 429 past the limit: before the upload exists
            return await _create(ctx, request, size, metadata, owner, is_partial, partials)
    return await _create(ctx, request, size, metadata, owner, is_partial, partials)


async def _create(
    ctx: TusContext,
    request: web.Request,
    size: int | None,
    metadata: str | None,
    owner: str,
    is_partial: bool,
    partials: list[UploadInfo],
) -> web.StreamResponse:
    """Create the upload, then assemble it (final) or take the POST's body (if any)."""
    partial_ids = [p.id for p in partials]
    has_body = request.body_exists
    info = await ctx.store.core.create(
        UploadInfo(
            id=new_upload_id(),
            size=size,
            metadata_raw=metadata,
            owner=owner,
            is_partial=is_partial,
            partial_uploads=tuple(partial_ids),
            assembled=not partial_ids,
        )
    )
    await ctx.lifecycle.created(request, info)
    location = upload_url(request, ctx.settings, info.id)
    headers = {"Location": location}

    if partial_ids:
        waiting = [p for p in partials if not p.is_complete]
        for partial in waiting:
            await ctx.store.core.update_info(partial.id, _waited_for_by(info.id))
        info = await assemble_if_ready(ctx, info.id)
        return web.Response(status=201, headers={**headers, **ctx.upload_headers(info)})

    if not has_body:
        headers.update(ctx.upload_headers(info))
        completion = await finish_if_complete(ctx, request, info, None)  # Upload-Length: 0
        return completion_response(201, headers, completion)
    interruptible = Interruptible()
    try:
        async with ctx.locker.hold(info.id, interruptible):
            outcome = await receive_body(ctx, request, info, interruptible)
    except LockBusy:
        raise errors.LOCKED.error() from None
    headers["Upload-Offset"] = str(outcome.info.offset)
    headers.update(ctx.upload_headers(outcome.info))
    completion = await outcome.finish(ctx, request)
    return completion_response(201, headers, completion)


def _waited_for_by(final_id: str) -> InfoChange:
    """The change that adds `final_id` to a partial's waiting finals (once)."""

    def change(partial: UploadInfo) -> UploadInfo:
        if final_id in partial.part_of:
            return partial
        return partial.replace(part_of=(*partial.part_of, final_id))

    return change
