"""The lifecycle hooks that tell NATS about uploads, and the completion contract (SPEC §3.2).

Every event goes through the outbox (recorded before the response is sent). On completion:

    Prefer: respond-async          -> 202 + Preference-Applied + Progress-Location at once
    processing disabled            -> 204 (201 for a POST) at once
    otherwise wait for the outcome -> processing.finished: 204/201
                                      processing.aborted: 422 + application/problem+json
                                      no outcome within processing.wait: 202 as respond-async
"""

from __future__ import annotations

import time
from datetime import datetime

from aiohttp import web

from events.model import (
    Event,
    ProcessingAborted,
    UploadBytesReceived,
    UploadCreated,
    UploadExpired,
    UploadProgress,
    UploadTerminated,
    from_timestamp,
    storage_from_json,
)
from events.outbox import Outbox
from events.waiters import OutcomeWaiters
from gateway.lifecycle import Completion, Lifecycle
from gateway.settings import Settings
from gateway.store.base import UploadInfo
from gateway.tus.context import upload_url

__all__ = ["EventLifecycle", "prefers_async"]

SOURCE = "/tusgate/gateway"


def prefers_async(request: web.Request) -> bool:
    """RFC 7240: `Prefer: respond-async` (possibly among other preferences)."""
    for header in request.headers.getall("Prefer", []):
        for pref in header.split(","):
            if pref.split(";")[0].strip().lower() == "respond-async":
                return True
    return False


class EventLifecycle(Lifecycle):
    wants_checksums = True  # upload.bytes-received carries sha256 (SPEC §5)
    def __init__(self, settings: Settings, outbox: Outbox, waiters: OutcomeWaiters | None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.waiters = waiters

    async def _record(self, event: Event) -> None:
        await self.outbox.record(event)

    def _expires(self, info: UploadInfo) -> datetime | None:
        expires = info.expires_at(self.settings.store_expiration)
        return from_timestamp(expires) if expires is not None else None

    async def created(self, request: web.Request, info: UploadInfo) -> None:
        await self._record(
            UploadCreated(
                event_source=SOURCE, upload_id=info.id, size=info.size, metadata=info.metadata,
                owner=info.owner, is_partial=info.is_partial, is_final=info.is_final,
                partial_uploads=info.partial_uploads, created_at=from_timestamp(info.created_at),
                expires_at=self._expires(info),
            )
        )

    async def progress(self, info: UploadInfo, *, request_ended: bool) -> None:
        # Rate-limited where the bytes are read (BodyReader: one call a second while receiving,
        # and one writer per upload), so every call here is an event.
        await self._record(
            UploadProgress(event_source=SOURCE, upload_id=info.id, offset=info.offset, size=info.size)
        )

    async def completed(
        self, request: web.Request | None, info: UploadInfo, checksums: dict[str, str]
    ) -> Completion:
        metadata = info.metadata
        event = UploadBytesReceived(
            event_source=SOURCE, upload_id=info.id, size=info.size or 0, metadata=metadata,
            owner=info.owner, storage=storage_from_json(info.storage), checksums=checksums,
            content_type=metadata.get("filetype"), filename=metadata.get("filename"),
            created_at=from_timestamp(info.created_at), completed_at=from_timestamp(time.time()),
        )
        if request is None:  # completed in the background (a final of unfinished partials)
            await self._record(event)
            return Completion()
        accepted = Completion(
            accepted=True,
            headers={
                "Preference-Applied": "respond-async",
                "Progress-Location": upload_url(request, self.settings, info.id, "/progress"),
            },
        )
        if prefers_async(request):
            await self._record(event)
            return accepted
        if not self.settings.processing_enabled or self.waiters is None:
            await self._record(event)
            return Completion()
        # Register before recording, so an outcome that comes back at once is not missed.
        with self.waiters.expect(info.id) as waiter:
            await self._record(event)
            outcome = await waiter.wait(self.settings.processing_wait)
        if outcome is None:
            return Completion(
                accepted=True,
                headers={"Progress-Location": accepted.headers["Progress-Location"]},
            )
        if isinstance(outcome, ProcessingAborted):
            return Completion(
                status=422,
                problem={
                    "type": f"urn:tusgate:problem:{outcome.code}",
                    "title": "Processing of the upload failed",
                    "detail": outcome.message,
                    "code": outcome.code,
                    "upload_id": info.id,
                    "retryable": outcome.retryable,
                },
            )
        return Completion()

    async def terminated(self, info: UploadInfo) -> None:
        await self._record(UploadTerminated(event_source=SOURCE, upload_id=info.id, at=from_timestamp(time.time())))

    async def expired(self, info: UploadInfo) -> None:
        await self._record(UploadExpired(event_source=SOURCE, upload_id=info.id, at=from_timestamp(time.time())))
