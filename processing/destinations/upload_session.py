"""Graph upload sessions: create or resume one, then our own fragment loop.

1. ``POST {drive}/root:/{path}:/createUploadSession`` through the Graph client (bearer token,
   msgraph-core middleware). The ``uploadUrl`` is recorded in the CheckpointStore **before** the
   first byte is sent, so a redelivered event or another worker resumes the same session
   instead of creating a second file.
2. Fragments of ``fragment_size`` bytes are read from the ByteSource (one fragment in memory at
   a time) and PUT to the uploadUrl with ``Content-Length`` and ``Content-Range: bytes
   a-b/total`` and **no** Authorization header. 202 → continue at ``nextExpectedRanges``;
   200/201 → the driveItem.
3. Faults: 429/503 honour ``Retry-After``; other 5xx, timeouts and dropped connections back off,
   then ``GET uploadUrl`` and resume from ``nextExpectedRanges``; 416 re-queries the status;
   404 means the session is gone: "Handle 404 Not Found errors when doing resumable uploads by
   starting the entire upload over."

The checkpoint (``kind: onedrive.upload-session``) holds ``upload_url``, ``expiration``,
``path``, ``drive``, ``size``, ``conflict`` and ``bytes_done``. The uploadUrl grants write
access without a token: keep the checkpoint store private and never log it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from processing.sources import ByteSource, SourceError, read_range

from .base import CheckpointStore, DeliveryTarget, ProgressCallback
from .digests import Digests
from .errors import (
    DeliveryConflict,
    DeliveryError,
    DestinationUnavailable,
    SourceFailed,
)
from .graph_http import (
    RetryBudget,
    graph_extensions,
    next_expected_offset,
    parse_expiration,
    parse_retry_after,
    rejected,
    response_json,
)

__all__ = ["CHECKPOINT_KIND", "SessionApi", "SessionUpload", "UploadSession"]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "onedrive.upload-session"
#: A recorded session this close to expiry is not worth resuming.
EXPIRY_MARGIN = timedelta(minutes=2)

#: Bytes per write of a fragment body.
_PIECE = 1024 * 1024

#: Looks up the item at the target path and returns it if it holds exactly our bytes
#: (hashing the rest of the source first if needed).
FindSame = Callable[[], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class UploadSession:
    url: str
    expiration: datetime | None


class SessionGone(Exception):
    """The upload session answered 404: expired, deleted, or already completed."""


class SessionApi:
    """The HTTP calls of an upload session (Graph client for creation, upload client after)."""

    def __init__(self, graph: httpx.AsyncClient, upload: httpx.AsyncClient) -> None:
        self.graph = graph
        self.upload = upload

    async def create(
        self, url: str, conflict: str, size: int, budget: RetryBudget
    ) -> UploadSession:
        """``createUploadSession``; DeliveryConflict on 409 (``fail`` and the name is taken)."""
        body = {"item": {"@microsoft.graph.conflictBehavior": conflict, "fileSize": size}}
        while True:
            budget.check_cancel()
            try:
                response = await self.graph.post(url, json=body, extensions=graph_extensions())
            except httpx.TransportError as exc:
                await budget.wait(f"createUploadSession failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status in (200, 201):
                payload = response_json(response)
                upload_url = payload.get("uploadUrl")
                if not isinstance(upload_url, str) or not upload_url.startswith(
                    ("https://", "http://")
                ):
                    raise DestinationUnavailable("createUploadSession returned no usable uploadUrl")
                return UploadSession(
                    upload_url, parse_expiration(payload.get("expirationDateTime"))
                )
            if status == 409:
                raise DeliveryConflict("an item with this name already exists")
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(f"createUploadSession: HTTP {status}", retry_after=retry_after)
                continue
            raise rejected(response, "createUploadSession")

    async def put_fragment(
        self, session: UploadSession, offset: int, data: bytes, size: int, budget: RetryBudget
    ) -> tuple[int, dict[str, Any] | None]:
        """PUT one fragment: (next offset, None), or (size, driveItem) once complete."""
        end = offset + len(data)
        headers = {
            "Content-Length": str(len(data)),
            "Content-Range": f"bytes {offset}-{end - 1}/{size}",
        }
        try:
            response = await self.upload.put(session.url, content=_pieces(data), headers=headers)
        except httpx.TransportError as exc:
            # "If an upload request is disconnected or fails before the request is completed,
            # all bytes in that request are ignored" -- ask where to continue.
            await budget.wait(f"fragment upload failed ({type(exc).__name__})")
            return await self.status(session, size, budget), None
        status = response.status_code
        if status == 202:
            reported = next_expected_offset(response_json(response))
            next_offset = _checked(end if reported is None else reported, size)
            if next_offset <= offset:
                # Accepted but not moved forward: count it, or a confused server loops us.
                await budget.wait("upload session did not advance", retry_after=0)
            return next_offset, None
        if status in (200, 201):
            return size, response_json(response)
        if status == 404:
            raise SessionGone
        if status == 409:
            # "If a conflict occurs after the file is uploaded ... an error is returned when the
            # last byte range is uploaded."
            raise DeliveryConflict("the target name was taken while uploading")
        if status == 416:
            # "the client sent a fragment the server had already received": re-query.
            await budget.wait("fragment range not accepted (416)", retry_after=0)
            return await self.status(session, size, budget), None
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            await budget.wait(f"fragment upload: HTTP {status}", retry_after=retry_after)
            return await self.status(session, size, budget), None
        raise rejected(response, "fragment upload")

    async def status(self, session: UploadSession, size: int, budget: RetryBudget) -> int:
        """``GET uploadUrl``: the offset to continue from (SessionGone on 404)."""
        while True:
            try:
                response = await self.upload.get(session.url)
            except httpx.TransportError as exc:
                await budget.wait(f"upload status query failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status == 200:
                offset = next_expected_offset(response_json(response))
                if offset is None:
                    # Nothing missing, yet nothing committed: not a state to continue from.
                    raise SessionGone
                return _checked(offset, size)
            if status == 404:
                raise SessionGone
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(f"upload status: HTTP {status}", retry_after=retry_after)
                continue
            raise rejected(response, "upload status")

    async def delete(self, url: str, budget: RetryBudget) -> None:
        """``DELETE uploadUrl`` ("This cleans up the temporary file holding the data")."""
        while True:
            try:
                response = await self.upload.delete(url)
            except httpx.TransportError as exc:
                await budget.wait(f"deleting the upload session failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status in (200, 202, 204, 404):
                return
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(
                    f"deleting the upload session: HTTP {status}", retry_after=retry_after
                )
                continue
            raise rejected(response, "deleting the upload session")

    async def delete_quietly(self, url: str) -> None:
        """Best effort: an undeleted session only holds temporary space until it expires."""
        budget = RetryBudget(
            max_attempts=2, backoff_initial=0.1, backoff_max=0.1, max_retry_after=1.0, cancel=None
        )
        with contextlib.suppress(DeliveryError):
            await self.delete(url, budget)


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """The fragment as a stream (Content-Length is set, so it is not sent chunked).

    Not ``content=data``: httpx responses sit in reference cycles that keep their request,
    and a request keeps its bytes, so every fragment would stay in memory until the garbage
    collector happens to run (hundreds of MiB for a 1 GiB file). A finished generator lets go.
    """
    for start in range(0, len(data), _PIECE):
        yield data[start : start + _PIECE]


def _checked(offset: int, size: int) -> int:
    """An offset the server reported; one outside the file means the session is unusable."""
    if not 0 <= offset < size:
        raise SessionGone
    return offset


def session_state(
    session: UploadSession, target: DeliveryTarget, drive: str, size: int, done: int
) -> dict[str, Any]:
    """What the checkpoint records about a session."""
    return {
        "kind": CHECKPOINT_KIND,
        "upload_url": session.url,
        "expiration": session.expiration.isoformat() if session.expiration else None,
        "path": target.path,
        "drive": drive,
        "size": size,
        "conflict": target.conflict,
        "bytes_done": done,
    }


def recorded_session(
    state: dict[str, Any], target: DeliveryTarget, drive: str, size: int
) -> UploadSession | None:
    """The recorded session if it is for this very delivery and not about to expire."""
    url = state.get("upload_url")
    if state.get("kind") != CHECKPOINT_KIND or not isinstance(url, str):
        return None
    recorded = (state.get("path"), state.get("drive"), state.get("size"), state.get("conflict"))
    if recorded != (target.path, drive, size, target.conflict):
        return None
    expiration = parse_expiration(state.get("expiration"))
    if expiration is not None and expiration - EXPIRY_MARGIN < datetime.now(UTC):
        return None
    return UploadSession(url, expiration)


class SessionUpload:
    """One delivery through an upload session (create or resume, fragments, restarts)."""

    def __init__(
        self,
        api: SessionApi,
        *,
        source: ByteSource,
        target: DeliveryTarget,
        drive: str,
        create_url: str,
        fragment_size: int,
        max_restarts: int,
        checkpoint: CheckpointStore,
        progress: ProgressCallback | None,
        budget: RetryBudget,
        digests: Digests,
        find_same: FindSame,
    ) -> None:
        self.api = api
        self.source = source
        self.target = target
        self.drive = drive
        self.create_url = create_url
        self.fragment_size = fragment_size
        self.max_restarts = max_restarts
        self.checkpoint = checkpoint
        self.progress = progress
        self.budget = budget
        self.digests = digests
        self.find_same = find_same
        self.session: UploadSession | None = None

    async def run(self) -> dict[str, Any]:
        """Upload everything; return the driveItem. Cleans up on a final failure or cancel;
        keeps the session and checkpoint on a retryable failure so the next attempt resumes."""
        try:
            return await self._loop()
        except DeliveryConflict:
            await self._discard()
            # conflict=fail and the name is taken: by our own file, if this is a redelivery.
            existing = await self.find_same()
            if existing is None:
                raise
            return existing
        except DeliveryError as exc:
            if not exc.retryable:
                await self._discard()
            raise
        except SourceError as exc:
            if not exc.retryable:
                await self._discard()
            raise SourceFailed(exc.message, retryable=exc.retryable, code=exc.code) from exc

    async def _loop(self) -> dict[str, Any]:
        size = self.source.size
        offset = await self._open()
        restarts = 0
        final_sent = False
        while True:
            self.budget.check_cancel()
            assert self.session is not None
            try:
                end = min(offset + self.fragment_size, size)
                await self.digests.catch_up(offset)
                data = await read_range(self.source, offset, end)
                if end == size:
                    # Last chance to refuse: this PUT commits the file.
                    await self.digests.feed_async(offset, data)
                    self.digests.check_declared(self.target.sha256)
                    final_sent = True
                    hashing = None
                else:
                    # Hash in a thread while the fragment travels (and the loop stays free).
                    hashing = asyncio.ensure_future(self.digests.feed_async(offset, data))
                try:
                    next_offset, item = await self.api.put_fragment(
                        self.session, offset, data, size, self.budget
                    )
                finally:
                    if hashing is not None:
                        await hashing
            except SessionGone:
                logger.info("upload session of %s is gone; starting a new one", self.target.key)
                restarts += 1
                if restarts > self.max_restarts:
                    raise DestinationUnavailable("upload session lost too many times") from None
                if final_sent and self.target.conflict != "rename":
                    # Perhaps the final fragment did commit and only the answer was lost.
                    existing = await self.find_same()
                    if existing is not None:
                        return existing
                offset, final_sent = await self._create(), False
                continue
            if item is not None:
                return item
            if next_offset > offset:
                self.budget.reset()
                await self._record(next_offset)
                if self.progress is not None:
                    await self.progress(next_offset)
            offset = next_offset

    async def _open(self) -> int:
        """Resume the recorded session when it still fits and lives; else create a new one."""
        state = await self.checkpoint.load(self.target.key)
        if state is not None:
            session = recorded_session(state, self.target, self.drive, self.source.size)
            if session is not None:
                self.session = session
                try:
                    offset = await self.api.status(session, self.source.size, self.budget)
                except SessionGone:
                    self.session = None
                else:
                    logger.info(
                        "resuming the upload session of %s at byte %d", self.target.key, offset
                    )
                    return offset
            elif isinstance(state.get("upload_url"), str):
                # Recorded for another path/size/drive, or about to expire: not reusable.
                await self.api.delete_quietly(state["upload_url"])
        return await self._create()

    async def _create(self) -> int:
        self.session = await self.api.create(
            self.create_url, self.target.conflict, self.source.size, self.budget
        )
        # Recorded before the first byte: whoever retries resumes this session.
        await self._record(0)
        self.budget.reset()
        return 0

    async def _record(self, done: int) -> None:
        assert self.session is not None
        state = session_state(self.session, self.target, self.drive, self.source.size, done)
        await self.checkpoint.save(self.target.key, state)

    async def _discard(self) -> None:
        """After a final failure or cancel: delete the session (best effort) and the record."""
        if self.session is not None:
            await self.api.delete_quietly(self.session.url)
        await self.checkpoint.delete(self.target.key)
