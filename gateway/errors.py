"""The one table of protocol errors, and the one place that turns errors into responses.

    Exception
    +-- TusError                  a named protocol error: status + code + one-line reason
    +-- events.OutboxWriteFailed  -> 507 (disk full) / 503
    +-- OSError from a store      -> 507 (disk full) / 503
    +-- gateway.store.StoreError  (store package) translated here:
        +-- UploadNotFound        -> 404
        +-- UploadGone            -> 410
        +-- OffsetConflict        -> 409
        +-- ConcatError           -> 400
        +-- StoreUnavailable      -> 503

Each handler raises `SOME_ERROR.error("detail")`; `error_middleware` renders it (no body on HEAD,
`Tus-Resumable` always). Anything else is logged once and becomes a 500.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from events.errors import OutboxWriteFailed
from gateway.store.base import (
    ConcatError,
    OffsetConflict,
    StoreUnavailable,
    UploadGone,
    UploadIncomplete,
    UploadNotFound,
)

__all__ = ["ErrorSpec", "TusError", "error_middleware", "error_response"]

log = logging.getLogger("tusgate.gateway")

TUS_VERSION = "1.0.0"


class TusError(Exception):
    def __init__(self, spec: ErrorSpec, detail: str | None = None) -> None:
        self.spec = spec
        self.reason = f"{spec.message}: {detail}" if detail else spec.message
        super().__init__(self.reason)


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    code: str
    message: str
    retry_after: int | None = None  # seconds, sent as Retry-After (503)

    def error(self, detail: str | None = None) -> TusError:
        return TusError(self, detail)


UNSUPPORTED_VERSION = ErrorSpec(412, "ERR_UNSUPPORTED_VERSION", "missing or unsupported Tus-Resumable")
INVALID_CONTENT_TYPE = ErrorSpec(
    415, "ERR_INVALID_CONTENT_TYPE", "PATCH needs Content-Type: application/offset+octet-stream"
)
INVALID_HEADER = ErrorSpec(400, "ERR_INVALID_HEADER", "malformed header")
INVALID_OFFSET = ErrorSpec(400, "ERR_INVALID_OFFSET", "missing or malformed Upload-Offset")
INVALID_LENGTH = ErrorSpec(400, "ERR_INVALID_LENGTH", "missing or malformed Upload-Length")
INVALID_METADATA = ErrorSpec(400, "ERR_INVALID_METADATA", "malformed Upload-Metadata")
INVALID_CONCAT = ErrorSpec(400, "ERR_INVALID_CONCAT", "malformed Upload-Concat")
INVALID_CHECKSUM = ErrorSpec(400, "ERR_INVALID_CHECKSUM", "malformed Upload-Checksum")
UNSUPPORTED_CHECKSUM = ErrorSpec(400, "ERR_UNSUPPORTED_CHECKSUM", "unsupported checksum algorithm")
CHECKSUM_MISMATCH = ErrorSpec(460, "ERR_CHECKSUM_MISMATCH", "checksum mismatch, chunk discarded")
OFFSET_MISMATCH = ErrorSpec(409, "ERR_MISMATCHED_OFFSET", "Upload-Offset does not match")
MAX_SIZE_EXCEEDED = ErrorSpec(413, "ERR_MAX_SIZE_EXCEEDED", "upload is larger than Tus-Max-Size")
SIZE_EXCEEDED = ErrorSpec(413, "ERR_UPLOAD_SIZE_EXCEEDED", "body goes past Upload-Length")
LENGTH_ALREADY_SET = ErrorSpec(400, "ERR_INVALID_LENGTH", "Upload-Length is already set")
LENGTH_TOO_SMALL = ErrorSpec(400, "ERR_INVALID_LENGTH", "Upload-Length is below the offset")
MODIFY_FINAL = ErrorSpec(403, "ERR_MODIFY_FINAL", "a final upload cannot be patched")
NOT_FOUND = ErrorSpec(404, "ERR_UPLOAD_NOT_FOUND", "upload not found")
GONE = ErrorSpec(410, "ERR_UPLOAD_GONE", "upload is gone")
NOT_COMPLETE = ErrorSpec(400, "ERR_UPLOAD_NOT_COMPLETE", "upload is not complete")
LOCKED = ErrorSpec(423, "ERR_UPLOAD_LOCKED", "upload is locked by another request")
INTERRUPTED = ErrorSpec(
    400, "ERR_UPLOAD_INTERRUPTED", "upload was taken over by a newer request for it"
)
BODY_INCOMPLETE = ErrorSpec(400, "ERR_BODY_INCOMPLETE", "request body ended early")
IDLE_TIMEOUT = ErrorSpec(408, "ERR_READ_TIMEOUT", "no body bytes received for too long")
METHOD_NOT_ALLOWED = ErrorSpec(405, "ERR_METHOD_NOT_ALLOWED", "method not allowed")
RANGE_NOT_SATISFIABLE = ErrorSpec(416, "ERR_RANGE", "requested range not satisfiable")
UNAUTHORIZED = ErrorSpec(401, "ERR_UNAUTHORIZED", "missing or invalid bearer token")
AUTH_UNAVAILABLE = ErrorSpec(
    503, "ERR_AUTH_UNAVAILABLE", "the token's keys cannot be fetched; retry later", 5
)
TOO_MANY_UPLOADS = ErrorSpec(
    429, "ERR_TOO_MANY_UPLOADS", "too many concurrent uploads for this owner; retry later", 2
)
STORAGE_FULL = ErrorSpec(507, "ERR_STORAGE_FULL", "no space left in the store; retry later")
STORE_UNAVAILABLE = ErrorSpec(503, "ERR_STORE_UNAVAILABLE", "store unavailable; retry later", 5)
LOCK_UNAVAILABLE = ErrorSpec(
    503, "ERR_LOCK_UNAVAILABLE", "the upload's lock cannot be reached; retry later", 2
)


def error_response(
    request: web.Request, status: int, reason: str, *, retry_after: int | None = None
) -> web.Response:
    """A one-line plain-text error; HEAD responses carry no body (RFC 9110)."""
    headers = {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store"}
    if status == 412:
        headers["Tus-Version"] = TUS_VERSION
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tusgate"'

    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, text=reason + "\n", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]  # what a middleware wraps


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TusError as exc:
        return error_response(request, exc.spec.status, exc.reason, retry_after=exc.spec.retry_after)
    except UploadNotFound:
        return error_response(request, 404, NOT_FOUND.message)
    except UploadGone as exc:
        return error_response(request, 410, f"{GONE.message} ({exc.reason})")
    except UploadIncomplete:
        return error_response(request, 400, NOT_COMPLETE.message)
    except OffsetConflict:
        return error_response(request, 409, OFFSET_MISMATCH.message)
    except ConcatError as exc:
        return error_response(request, 400, f"{INVALID_CONCAT.message}: {exc}")
    except StoreUnavailable as exc:  # the client can resume once the store is back
        log.warning("store unavailable for %s %s: %s", request.method, request.path, exc)
        return error_response(request, 503, STORE_UNAVAILABLE.message, retry_after=STORE_UNAVAILABLE.retry_after)
    except OutboxWriteFailed as exc:
        # The event could not be kept, so the request must not look successful.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return error_response(request, 507, STORAGE_FULL.message)
        log.error("outbox write failed for %s %s: %s", request.method, request.path, exc)
        return error_response(request, 503, STORE_UNAVAILABLE.message, retry_after=STORE_UNAVAILABLE.retry_after)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the client can resume once space is back
            return error_response(request, 507, STORAGE_FULL.message)
        log.exception("store I/O failed for %s %s", request.method, request.path)
        return error_response(request, 503, STORE_UNAVAILABLE.message, retry_after=STORE_UNAVAILABLE.retry_after)
    except web.HTTPException as exc:
        if exc.status == 405:
            return error_response(request, 405, METHOD_NOT_ALLOWED.message)
        raise
