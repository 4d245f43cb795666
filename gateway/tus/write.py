"""Receiving bytes, shared by PATCH and creation-with-upload POST.

    receive_body  -> checks the body headers, streams it into the store under the upload's lock
    finish_if_complete -> the last byte is in: checksums, completion hook, concat waiters
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.errors import TusError
from gateway.lifecycle import Completion
from gateway.metrics import METRICS
from gateway.store.base import UploadInfo
from gateway.tus.body import BodyReader
from gateway.tus.checksums import Hasher, new_hasher
from gateway.tus.context import TusContext
from gateway.tus.headers import parse_checksum

__all__ = ["Interruptible", "WriteOutcome", "finish_if_complete", "receive_body"]

log = logging.getLogger("tusgate.gateway")

OCTET_STREAM = "application/offset+octet-stream"


class Interruptible:
    """The lock's takeover callback for one request: ends its body read if one is running."""

    def __init__(self) -> None:
        self.requested = False
        self.reader: BodyReader | None = None

    def __call__(self) -> None:
        self.requested = True
        if self.reader is not None:
            self.reader.interrupt(errors.INTERRUPTED)


@dataclass(frozen=True)
class WriteOutcome:
    info: UploadInfo  # with the new offset
    whole_hash: Any  # running hash of bytes [0, offset), or None
    error: TusError | None = None  # how the request ended, if not well; the bytes are kept

    async def finish(self, ctx: TusContext, request: web.Request) -> Completion | None:
        """Complete the upload if these bytes completed it -- even when the request then failed
        (a chunked body that ran past the length, a client gone after its last byte): the upload
        is whole and must be processed. Then raise the request's error, if any."""
        # A failed request does not wait for processing: nobody may be there to hear it.
        completion = await finish_if_complete(
            ctx, request if self.error is None else None, self.info, self.whole_hash
        )
        if self.error is not None:
            raise self.error
        return completion


def check_content_type(request: web.Request) -> None:
    if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != OCTET_STREAM:
        raise errors.INVALID_CONTENT_TYPE.error()


async def receive_body(
    ctx: TusContext, request: web.Request, info: UploadInfo, interruptible: Interruptible
) -> WriteOutcome:
    """Stream the request body into the store at `info.offset`. The caller holds the lock.

    Bytes that arrived are kept even when the client goes away or a newer request takes the
    upload over -- except a checksummed chunk, which is all-or-nothing. Errors found before a
    byte is written are raised; how a started body ended is in the outcome's `error`.
    """
    offset = info.offset
    room = (info.size if info.size is not None else ctx.settings.server_max_size) - offset
    length = request.content_length  # None for a chunked body
    if length is not None and length > room:
        # "The Server MUST respond with 413 if the length of the upload exceeds Upload-Length"
        # (or Tus-Max-Size) -- decided before one byte is written, so there is no side effect.
        spec = errors.SIZE_EXCEEDED if info.size is not None else errors.MAX_SIZE_EXCEEDED
        raise spec.error(f"{length} bytes offered, {room} allowed")

    checksum: tuple[str, bytes, Hasher] | None = None
    if "Upload-Checksum" in request.headers:
        algorithm, expected = parse_checksum(request.headers["Upload-Checksum"])
        checksum = (algorithm, expected, new_hasher(algorithm))

    whole_hash = ctx.digests.take(info.id, offset) if ctx.lifecycle.wants_checksums else None
    hashers = [h for h in (whole_hash, checksum[2] if checksum else None) if h is not None]
    reader = BodyReader(
        request,
        limit=room,
        buffer_size=ctx.settings.server_buffer_size,
        idle_timeout=ctx.settings.server_idle_timeout,
        hashers=hashers,
        on_progress=lambda received: ctx.lifecycle.progress(
            info.replace(offset=offset + received), request_ended=False
        ),
        hash_executor=ctx.hash_executor,
    )
    interruptible.reader = reader
    if interruptible.requested:
        reader.interrupt(errors.INTERRUPTED)

    def verified() -> bool:
        assert checksum is not None
        return not reader.exceeded and hmac.compare_digest(checksum[2].digest(), checksum[1])

    failure: BaseException | None = None
    written = 0
    metrics = request.app[METRICS]
    metrics.active_uploads += 1
    try:
        written = await ctx.store.core.write_chunk(
            info.id, offset, reader, check=verified if checksum else None
        )
    except TusError as exc:  # interrupted by us: takeover or idle timeout
        failure = exc
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            raise  # a store failure (disk full...), mapped by the error middleware
        failure = exc
    except web.HTTPException:
        raise
    except Exception as exc:  # aiohttp payload errors (bad chunked encoding, ...)
        if type(exc).__module__.startswith("aiohttp"):
            failure = exc
        else:
            raise

    finally:
        metrics.active_uploads -= 1
    if failure is not None:
        # What arrived before the failure is stored; say so via the new offset, then report.
        written = reader.received if checksum is None else 0
    metrics.bytes_received += written
    kept_hash = whole_hash if written == reader.received else None
    if failure is None:
        # write_chunk returned: exactly `written` bytes follow `offset`, durably.
        info = info.replace(offset=offset + written, updated_at=time.time())
    else:
        # The store knows best what survived a broken request.
        info = await ctx.store.core.get_info(info.id)
        if kept_hash is not None and info.offset != offset + written:
            kept_hash = None
    ctx.digests.keep(info.id, info.offset, kept_hash)
    await ctx.lifecycle.progress(info, request_ended=True)

    error: TusError | None = None
    if isinstance(failure, TusError):
        error = failure
    elif failure is not None:
        error = errors.BODY_INCOMPLETE.error(type(failure).__name__)
    elif reader.exceeded:
        spec = errors.SIZE_EXCEEDED if info.size is not None else errors.MAX_SIZE_EXCEEDED
        error = spec.error("body is longer than the upload's remaining length")
    elif checksum is not None and written == 0 and reader.received > 0:
        error = errors.CHECKSUM_MISMATCH.error(checksum[0])
    return WriteOutcome(info=info, whole_hash=kept_hash, error=error)


async def finish_if_complete(
    ctx: TusContext, request: web.Request | None, info: UploadInfo, whole_hash: Any
) -> Completion | None:
    """After the last byte: partials wake their finals; whole uploads go to the lifecycle."""
    if not info.is_complete:
        return None
    if info.is_partial:
        ctx.digests.forget(info.id)
        # Imported here: concat imports this module to complete the finals it builds.
        from gateway.tus.concat import assemble_if_ready

        for final_id in info.part_of:
            ctx.spawn(assemble_if_ready(ctx, final_id), name=f"assemble-{final_id}")
        return None
    if request is not None:
        request.app[METRICS].observe_upload_duration(time.time() - info.created_at)
    checksums = {}
    if ctx.lifecycle.wants_checksums:
        checksums = await ctx.digests.finish(ctx.store, info, whole_hash)
    return await ctx.lifecycle.completed(request, info, checksums)
