"""The IETF "Resumable Uploads for HTTP" draft on the TUS endpoint (SPEC §3.1, optional).

A request that carries `Upload-Draft-Interop-Version` and no `Tus-Resumable` speaks the draft.
It is translated into its TUS equivalent and served by the same handlers -- same store, lock,
limits, events and completion contract -- and the answer is translated back:

    draft request                              served as
    POST  Upload-Complete: ?1, a body          POST creation-with-upload, Upload-Length = the
                                               body's length (or the Upload-Length sent)
    POST  Upload-Complete: ?0 [+ a body]       POST, Upload-Length if sent, else deferred
    HEAD                                       HEAD, answered 204 + Upload-Complete
    PATCH Upload-Offset, Upload-Complete       PATCH; ?1 on a deferred length declares
                                               offset + body length
    DELETE                                     DELETE

Any body content type is accepted (the draft's `application/partial-upload` for appends).
Every answer carries `Upload-Draft-Interop-Version`, `Upload-Complete` where the state is known,
and no TUS headers; a 409 carries the current `Upload-Offset`.

Interop versions 5 (draft-03) and 6 (draft-05): what tus-js-client speaks with
`protocol: "ietf-draft-03" | "ietf-draft-05"` (tested with it). Not offered: the 104
(Upload Resumption Supported) informational response -- aiohttp cannot send one -- so a client
learns the upload's URL from the final answer to its POST, as in TUS; and a final
`Upload-Complete: ?1` append of unknown length (chunked, no Upload-Length) on an upload whose
length is deferred leaves the length open.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from gateway import errors
from gateway.errors import Handler
from gateway.store.base import StoreError
from gateway.tus.context import TUS
from gateway.tus.headers import TUS_VERSION

__all__ = ["INTEROP_HEADER", "is_draft_request", "serve_draft"]

INTEROP_HEADER = "Upload-Draft-Interop-Version"
INTEROP_VERSIONS = frozenset({"5", "6"})
OCTET_STREAM = "application/offset+octet-stream"
TUS_ONLY = ("Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Upload-Defer-Length")


def is_draft_request(request: web.Request) -> bool:
    return INTEROP_HEADER in request.headers and "Tus-Resumable" not in request.headers


def _upload_complete(request: web.Request, *, required: bool) -> bool | None:
    """The structured boolean `Upload-Complete` (`?1` / `?0`)."""
    value = request.headers.get("Upload-Complete")
    if value is None:
        if required:
            raise errors.INVALID_HEADER.error("Upload-Complete is required")
        return None
    value = value.strip()
    if value not in ("?1", "?0"):
        raise errors.INVALID_HEADER.error("Upload-Complete must be ?1 or ?0")
    return value == "?1"


def _tus_headers(request: web.Request, method: str) -> CIMultiDict[str]:
    """The request's headers as the TUS handlers expect them for `method`."""
    headers: CIMultiDict[str] = CIMultiDict(request.headers)
    headers.popall(INTEROP_HEADER, None)
    headers["Tus-Resumable"] = TUS_VERSION
    if method not in ("POST", "PATCH"):
        return headers
    complete = _upload_complete(request, required=method == "POST")
    if request.body_exists or method == "PATCH":
        headers["Content-Type"] = OCTET_STREAM  # the draft takes any content type
    length = request.content_length
    if method == "POST" and "Upload-Length" not in headers:
        if complete and length is not None:
            headers["Upload-Length"] = str(length)  # the body is the whole upload
        else:
            headers["Upload-Defer-Length"] = "1"
    if method == "PATCH" and complete and "Upload-Length" not in headers and length is not None:
        offset = headers.get("Upload-Offset", "")
        if offset.isdigit():
            # Declares the length of a deferred upload (the TUS PATCH ignores an equal one).
            headers["Upload-Length"] = str(int(offset) + length)
    return headers


async def serve_draft(request: web.Request, method: str, handler: Handler) -> web.StreamResponse:
    """Serve a draft request with the TUS `handler` for `method` (see the module docstring)."""
    version = request.headers[INTEROP_HEADER].strip()
    if version not in INTEROP_VERSIONS:
        raise errors.INVALID_HEADER.error(
            f"{INTEROP_HEADER} {version[:8]!r} is not supported (5, 6 are)"
        )
    try:
        response = await handler(request.clone(headers=_tus_headers(request, method)))
    except errors.TusError as exc:
        if exc.spec is not errors.OFFSET_MISMATCH:
            raise
        response = errors.error_response(request, 409, exc.reason)
        await _add_current_offset(request, response)
    _as_draft(response, method, version)
    if response.status < 300 and "Upload-Offset" in response.headers:
        response.headers["Upload-Complete"] = "?1" if await _is_complete(request, response) else "?0"
    return response


async def _is_complete(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether the upload this answer is about has all its bytes (the store says)."""
    ctx = request.app[TUS]
    location = response.headers.get("Location")
    upload_id = location.rsplit("/", 1)[1] if location else ctx.upload_id(request)
    try:
        return (await ctx.store.core.get_info(upload_id)).is_complete
    except StoreError:
        return False


async def _add_current_offset(request: web.Request, response: web.StreamResponse) -> None:
    """The draft's 409 tells the client where the upload is."""
    ctx = request.app[TUS]
    info = await ctx.store.core.get_info(ctx.upload_id(request))
    response.headers["Upload-Offset"] = str(info.offset)


def _as_draft(response: web.StreamResponse, method: str, version: str) -> None:
    for name in TUS_ONLY:
        response.headers.popall(name, None)
    response.headers[INTEROP_HEADER] = version
    if method == "HEAD" and response.status == 200:
        response.set_status(204)
