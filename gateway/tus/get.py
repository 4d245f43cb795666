"""GET /files/{id} -- download what was received, with single-range `Range` support."""

from __future__ import annotations

import re
from urllib.parse import quote

from aiohttp import web

from gateway import errors
from gateway.tus.context import TUS

__all__ = ["handle_get"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)\Z")
# Types safe to serve inline; anything else is an attachment, so a stored HTML file cannot run
# script in this origin (the same reasoning as tusd's allow-list).
_INLINE_TYPES = re.compile(r"^(image/(png|jpeg|gif|webp)|text/plain|application/pdf|audio/\w+|video/\w+)\Z")
_MIME = re.compile(r"^[\w.+-]+/[\w.+-]+\Z")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`Range: bytes=a-b` -> [start, end) or None for the whole body; raises 416."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None  # RFC 9110: a Range we do not understand is ignored
    first, last = _number(match.group(1)), _number(match.group(2))
    if first is not None:
        end = min(last + 1, size) if last is not None else size
        if first >= size or (last is not None and last < first):
            raise errors.RANGE_NOT_SATISFIABLE.error(f"size is {size}")
        return first, end
    assert last is not None
    if last == 0 or size == 0:  # no byte can be selected
        raise errors.RANGE_NOT_SATISFIABLE.error(f"size is {size}")
    return max(size - last, 0), size


def _number(digits: str) -> int | None:
    """Positions beyond 2^63 mean "past any upload"; int() of thousands of digits would raise."""
    if not digits:
        return None
    return int(digits) if len(digits) <= 19 else 2**63


async def handle_get(request: web.Request) -> web.StreamResponse:
    ctx = request.app[TUS]
    info = await ctx.store.core.get_info(ctx.upload_id(request))
    if ctx.store.reader is None:
        raise errors.METHOD_NOT_ALLOWED.error("this store cannot serve content")
    if info.is_final and not info.assembled:
        raise errors.NOT_COMPLETE.error()
    size = info.offset
    byte_range = parse_range(request.headers.get("Range"), size)
    start, end = byte_range or (0, size)
    metadata = info.metadata
    filetype = metadata.get("filetype") or ""
    content_type = filetype if _MIME.match(filetype) else "application/octet-stream"
    disposition = "inline" if _INLINE_TYPES.match(content_type) else "attachment"
    filename = metadata.get("filename")
    if filename:
        disposition += f"; filename*=UTF-8''{quote(filename, safe='')}"
    headers = {
        "Content-Type": content_type,
        "Content-Disposition": disposition,
        "Content-Length": str(end - start),
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    chunks = ctx.store.reader.read(info.id, start, end)
    # The first piece is read before the status line goes out: a store that cannot serve these
    # bytes yet (S3, unfinished upload) must answer 400, not a 200 with a truncated body.
    first = await anext(chunks, b"")
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    if first:
        await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response
