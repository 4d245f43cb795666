"""OneDrive destination: Microsoft Graph upload sessions with our own fragment loop.

Small files (< ``simple_upload_max``, 4 MiB, including empty files, which a session cannot
carry) go up in one ``PUT {drive}/root:/{path}:/content``. Larger ones:

1. ``POST {drive}/root:/{path}:/createUploadSession`` through the Graph client (bearer token,
   msgraph-core middleware); the ``uploadUrl`` is recorded in the CheckpointStore **before** the
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
4. The sha256 of the bytes read is compared with the declared one before the last fragment
   commits the file, and with the driveItem's ``sha256Hash``/``quickXorHash`` afterwards.

The checkpoint (``kind: onedrive.upload-session``) holds ``upload_url``, ``expiration``,
``path``, ``drive``, ``size``, ``conflict`` and ``bytes_done``. The uploadUrl grants write access
without a token: keep the checkpoint store private, never log it.

Known limit: with ``conflict=rename``, if the final fragment was committed but the answer was
lost, the retry cannot tell its own file from an older one and may create ``name 1.ext``.
With ``fail`` (same bytes already there → success) and ``replace`` there is always one file.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from processing.sources import ByteSource, SourceError, open_range, read_range

from .base import CheckpointStore, DeliveryResult, DeliveryTarget, ProgressCallback
from .errors import (
    ChecksumMismatch,
    DeliveryCanceled,
    DeliveryConflict,
    DeliveryError,
    DestinationUnavailable,
    InvalidTarget,
    SourceFailed,
)
from .graph_auth import BearerAuth, TokenProvider
from .graph_http import (
    GRAPH_EXTENSIONS,
    RetryBudget,
    create_graph_client,
    create_upload_client,
    drive_path,
    item_url,
    next_expected_offset,
    parse_expiration,
    parse_retry_after,
    rejected,
    response_json,
)
from .manifest import Manifest, manifest_path
from .paths import split_target_path
from .quickxor import QuickXorHash

__all__ = [
    "DEFAULT_FRAGMENT_SIZE",
    "DEFAULT_GRAPH_BASE_URL",
    "FRAGMENT_UNIT",
    "MAX_FRAGMENT_SIZE",
    "SIMPLE_UPLOAD_MAX",
    "OneDriveDestination",
    "OneDriveSettings",
]

DEFAULT_GRAPH_BASE_URL = "https://graph.microsoft.com/v1.0"
#: "the size of each byte range MUST be a multiple of 320 KiB (327,680 bytes)"
FRAGMENT_UNIT = 320 * 1024
#: "the maximum bytes in any given request is less than 60 MiB"
MAX_FRAGMENT_SIZE = 60 * 1024 * 1024
#: "A byte range size of 10 MiB for stable high speed connections is optimal."
DEFAULT_FRAGMENT_SIZE = 32 * FRAGMENT_UNIT
#: Simple upload "only supports files up to 4MB in size".
SIMPLE_UPLOAD_MAX = 4 * 1024 * 1024

_CHECKPOINT_KIND = "onedrive.upload-session"
#: A recorded session this close to expiry is not worth resuming.
_EXPIRY_MARGIN = timedelta(minutes=2)


@dataclass(frozen=True, kw_only=True)
class OneDriveSettings:
    """Settings of the OneDrive destination; every field has a default and a unit."""

    #: Graph root, any Graph-compatible endpoint (``TUSGATE_GRAPH_BASE_URL``).
    base_url: str = DEFAULT_GRAPH_BASE_URL
    #: Default drive: ``me``, ``drives/ID`` (or a bare ID), ``users/ID``, ``groups/ID``,
    #: ``sites/ID``; ``users/{owner}`` delivers into the drive of the upload's owner.
    drive: str = "me"
    #: Bytes per fragment PUT: a multiple of 320 KiB, at most 60 MiB.
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    #: Files smaller than this (bytes, at most 4 MiB) use one simple upload.
    simple_upload_max: int = SIMPLE_UPLOAD_MAX
    #: Attempts per request/fragment before a retryable DestinationUnavailable.
    max_attempts: int = 8
    #: First backoff delay and its cap, seconds (exponential, full jitter).
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Longest Retry-After (seconds) we sleep through; longer ones end the attempt (retryable).
    max_retry_after: float = 300.0
    #: Times a lost/expired session is replaced by a new one within one delivery.
    max_session_restarts: int = 3
    #: Retries msgraph-core's RetryHandler makes per API call (429/503/504), 0..10.
    middleware_retries: int = 2
    #: Connect and per-request timeouts, seconds.
    connect_timeout: float = 30.0
    request_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("https://", "http://")):
            raise ValueError("graph base_url must be an http(s) URL")
        drive_path(self.drive.replace("{owner}", "owner"))  # ValueError naming the problem
        if self.fragment_size <= 0 or self.fragment_size % FRAGMENT_UNIT:
            raise ValueError(
                "graph fragment_size must be a positive multiple of 320 KiB (327680 bytes)"
            )
        if self.fragment_size > MAX_FRAGMENT_SIZE:
            raise ValueError("graph fragment_size must be at most 60 MiB")
        if not 0 <= self.simple_upload_max <= SIMPLE_UPLOAD_MAX:
            raise ValueError("graph simple_upload_max must be between 0 and 4 MiB")
        if self.max_attempts < 1 or self.max_session_restarts < 0:
            raise ValueError("graph max_attempts must be >= 1 and max_session_restarts >= 0")
        if not 0 <= self.middleware_retries <= 10:
            raise ValueError("graph middleware_retries must be between 0 and 10")
        if min(self.backoff_initial, self.backoff_max, self.max_retry_after) < 0:
            raise ValueError("graph backoff and Retry-After limits must not be negative")
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("graph timeouts must be positive")


@dataclass(frozen=True)
class _Session:
    url: str
    expiration: datetime | None


class _SessionGone(Exception):
    """The upload session answered 404: expired, deleted, or already completed."""


class _Digests:
    """sha256 + QuickXorHash of the source, fed in order exactly once per byte.

    Fragments may be sent more than once (retries) and a resumed session may start past bytes
    this process never read; ``catch_up`` reads such a gap from the source without sending it.
    """

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.quickxor = QuickXorHash()
        self.upto = 0

    async def catch_up(self, offset: int) -> None:
        if offset > self.upto:
            async with open_range(self.source, self.upto, offset) as chunks:
                async for chunk in chunks:
                    self._update(chunk)

    def feed(self, start: int, data: bytes) -> None:
        end = start + len(data)
        if start <= self.upto < end:
            self._update(data[self.upto - start :] if self.upto > start else data)

    def _update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.quickxor.update(chunk)
        self.upto += len(chunk)


class OneDriveDestination:
    """Deliver into OneDrive/SharePoint through Microsoft Graph (see the module docstring).

    ``graph_client``/``upload_client`` may be injected (tests, shared pools); clients created
    here are closed by :meth:`aclose`. The token provider belongs to the caller.
    """

    kind = "onedrive"

    def __init__(
        self,
        settings: OneDriveSettings,
        token_provider: TokenProvider,
        *,
        graph_client: httpx.AsyncClient | None = None,
        upload_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
        self._owned: list[httpx.AsyncClient] = []
        if graph_client is None:
            graph_client = create_graph_client(
                BearerAuth(token_provider),
                timeout=timeout,
                middleware_retries=settings.middleware_retries,
            )
            self._owned.append(graph_client)
        if upload_client is None:
            upload_client = create_upload_client(timeout=timeout)
            self._owned.append(upload_client)
        self._graph = graph_client
        self._upload = upload_client

    async def aclose(self) -> None:
        for client in self._owned:
            await client.aclose()
        self._owned.clear()

    # -- public API ------------------------------------------------------------------------

    async def deliver(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        *,
        checkpoint: CheckpointStore,
        progress: ProgressCallback | None = None,
        cancel: asyncio.Event | None = None,
    ) -> DeliveryResult:
        components = split_target_path(target.path)
        drive = self._drive_for(target)
        if cancel is not None and cancel.is_set():
            await self.abort(target.key, checkpoint)
            raise DeliveryCanceled("delivery canceled")
        budget = self._budget(cancel)
        try:
            if source.size < self.settings.simple_upload_max:
                item, digests = await self._simple_upload(source, target, drive, components, budget)
            else:
                item, digests = await self._session_upload(
                    source, target, drive, components, checkpoint, progress, budget
                )
        except SourceError as exc:
            raise SourceFailed(exc.message, retryable=exc.retryable) from exc
        self._verify_item(item, source.size, digests)
        await checkpoint.delete(target.key)
        if progress is not None:
            await progress(source.size)
        final_path = "/".join([*components[:-1], str(item.get("name") or components[-1])])
        return DeliveryResult(
            destination=f"onedrive:{drive}/root:/{final_path}",
            item_id=str(item.get("id", "")),
            web_url=str(item.get("webUrl", "")),
            size=source.size,
            sha256=digests.sha256.hexdigest(),
            path=final_path,
        )

    async def abort(self, key: str, checkpoint: CheckpointStore) -> None:
        """DELETE the recorded session ("This cleans up the temporary file holding the data
        previously uploaded"), then forget it. Retryable error if Graph could not be reached."""
        state = await checkpoint.load(key)
        url = state.get("upload_url") if state else None
        if isinstance(url, str) and url:
            await self._delete_session(url, self._budget(None))
        await checkpoint.delete(key)

    async def write_manifest(self, result: DeliveryResult, manifest: Manifest) -> str:
        """Upload ``<name>.manifest.json`` beside the file (simple upload, replace)."""
        relative = manifest_path(result.path)
        components = split_target_path(relative)
        prefix = "onedrive:"
        drive = self.settings.drive
        if result.destination.startswith(prefix) and "/root:/" in result.destination:
            drive_part = result.destination[len(prefix) : result.destination.index("/root:/")]
        else:
            drive_part = drive_path(drive)
        url = item_url(self.settings.base_url, drive_part, components, "content")
        await self._put_content(
            f"{url}?@microsoft.graph.conflictBehavior=replace",
            manifest.to_json(),
            "application/json",
            self._budget(None),
        )
        return relative

    # -- simple upload ---------------------------------------------------------------------

    async def _simple_upload(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        drive: str,
        components: list[str],
        budget: RetryBudget,
    ) -> tuple[dict[str, Any], _Digests]:
        data = await read_range(source, 0, source.size)
        digests = _Digests(source)
        digests.feed(0, data)
        self._check_declared(target, digests)
        url = item_url(self.settings.base_url, drive, components, "content")
        # PUT content takes conflict behaviour as a query parameter (its default is replace).
        url = f"{url}?@microsoft.graph.conflictBehavior={target.conflict}"
        try:
            return await self._put_content(url, data, target.content_type, budget), digests
        except DeliveryConflict:
            existing = await self._same_file(drive, components, source.size, digests)
            if existing is None:
                raise
            return existing, digests

    async def _put_content(
        self, url: str, data: bytes, content_type: str, budget: RetryBudget
    ) -> dict[str, Any]:
        while True:
            if budget.cancel is not None and budget.cancel.is_set():
                raise DeliveryCanceled("delivery canceled")
            try:
                response = await self._graph.put(
                    url,
                    content=data,
                    headers={"Content-Type": content_type},
                    extensions=dict(GRAPH_EXTENSIONS),
                )
            except httpx.TransportError as exc:
                await budget.wait(f"simple upload failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status in (200, 201):
                return response_json(response)
            if status == 409:
                raise DeliveryConflict("an item with this name already exists")
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(f"simple upload: HTTP {status}", retry_after=retry_after)
                continue
            raise rejected(response, "simple upload")

    # -- upload session --------------------------------------------------------------------

    async def _session_upload(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        drive: str,
        components: list[str],
        checkpoint: CheckpointStore,
        progress: ProgressCallback | None,
        budget: RetryBudget,
    ) -> tuple[dict[str, Any], _Digests]:
        size = source.size
        digests = _Digests(source)
        session: _Session | None = None
        try:
            session, offset = await self._open_session(
                target, drive, components, size, checkpoint, budget
            )
            restarts = 0
            final_sent = False
            while True:
                if budget.cancel is not None and budget.cancel.is_set():
                    raise DeliveryCanceled("delivery canceled")
                try:
                    end = min(offset + self.settings.fragment_size, size)
                    await digests.catch_up(offset)
                    data = await read_range(source, offset, end)
                    digests.feed(offset, data)
                    if end == size:
                        # Last chance to refuse: this PUT commits the file.
                        self._check_declared(target, digests)
                        final_sent = True
                    next_offset, item = await self._put_fragment(
                        session, offset, data, size, budget
                    )
                except _SessionGone:
                    restarts += 1
                    if restarts > self.settings.max_session_restarts:
                        raise DestinationUnavailable("upload session lost too many times") from None
                    if final_sent and target.conflict != "rename":
                        # Maybe our final fragment did commit and only the answer was lost.
                        await digests.catch_up(size)
                        existing = await self._same_file(drive, components, size, digests)
                        if existing is not None:
                            return existing, digests
                    session = await self._create_session(
                        target, drive, components, size, checkpoint, budget
                    )
                    offset, final_sent = 0, False
                    continue
                if item is not None:
                    return item, digests
                if next_offset > offset:
                    budget.reset()
                    await checkpoint.save(
                        target.key, self._state(session, target, drive, size, next_offset)
                    )
                    if progress is not None:
                        await progress(next_offset)
                offset = next_offset
        except DeliveryConflict:
            await self._discard(session, checkpoint, target.key)
            await digests.catch_up(size)
            existing = await self._same_file(drive, components, size, digests)
            if existing is None:
                raise
            return existing, digests
        except DeliveryError as exc:
            if not exc.retryable:
                await self._discard(session, checkpoint, target.key)
            raise
        except SourceError as exc:
            if not exc.retryable:
                await self._discard(session, checkpoint, target.key)
            raise SourceFailed(exc.message, retryable=exc.retryable) from exc

    async def _put_fragment(
        self, session: _Session, offset: int, data: bytes, size: int, budget: RetryBudget
    ) -> tuple[int, dict[str, Any] | None]:
        """PUT one fragment; return (next offset, None) or (size, driveItem). Retries inside."""
        end = offset + len(data)
        headers = {
            "Content-Length": str(len(data)),
            "Content-Range": f"bytes {offset}-{end - 1}/{size}",
        }
        try:
            response = await self._upload.put(session.url, content=data, headers=headers)
        except httpx.TransportError as exc:
            # "If an upload request is disconnected or fails before the request is completed,
            # all bytes in that request are ignored" -- ask where to continue.
            await budget.wait(f"fragment upload failed ({type(exc).__name__})")
            return await self._status(session, budget), None
        status = response.status_code
        if status == 202:
            reported = next_expected_offset(response_json(response))
            return (end if reported is None else reported), None
        if status in (200, 201):
            return size, response_json(response)
        if status == 404:
            raise _SessionGone
        if status == 409:
            # "If a conflict occurs after the file is uploaded ... an error is returned when the
            # last byte range is uploaded."
            raise DeliveryConflict("the target name was taken while uploading")
        if status == 416:
            # "the client sent a fragment the server had already received": re-query.
            await budget.wait("fragment range not accepted (416)", retry_after=0)
            return await self._status(session, budget), None
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            await budget.wait(f"fragment upload: HTTP {status}", retry_after=retry_after)
            return await self._status(session, budget), None
        raise rejected(response, "fragment upload")

    async def _status(self, session: _Session, budget: RetryBudget) -> int:
        """GET the uploadUrl: the offset to continue from (``_SessionGone`` on 404)."""
        while True:
            try:
                response = await self._upload.get(session.url)
            except httpx.TransportError as exc:
                await budget.wait(f"upload status query failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status == 200:
                offset = next_expected_offset(response_json(response))
                if offset is None:
                    # Nothing missing yet not committed: not a state we can continue from.
                    raise _SessionGone
                return offset
            if status == 404:
                raise _SessionGone
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(f"upload status: HTTP {status}", retry_after=retry_after)
                continue
            raise rejected(response, "upload status")

    async def _open_session(
        self,
        target: DeliveryTarget,
        drive: str,
        components: list[str],
        size: int,
        checkpoint: CheckpointStore,
        budget: RetryBudget,
    ) -> tuple[_Session, int]:
        """Resume the recorded session when it still fits and lives; else create a new one."""
        state = await checkpoint.load(target.key)
        if state is not None:
            session = self._recorded(state, target, drive, size)
            if session is not None:
                try:
                    return session, await self._status(session, budget)
                except _SessionGone:
                    pass
            elif isinstance(state.get("upload_url"), str):
                # Recorded for another path/size/drive, or about to expire: not reusable.
                await self._delete_session_quietly(state["upload_url"])
        return await self._create_session(target, drive, components, size, checkpoint, budget), 0

    def _recorded(
        self, state: dict[str, Any], target: DeliveryTarget, drive: str, size: int
    ) -> _Session | None:
        url = state.get("upload_url")
        if state.get("kind") != _CHECKPOINT_KIND or not isinstance(url, str):
            return None
        if (state.get("path"), state.get("drive"), state.get("size"), state.get("conflict")) != (
            target.path,
            drive,
            size,
            target.conflict,
        ):
            return None
        expiration = parse_expiration(state.get("expiration"))
        if expiration is not None and expiration - _EXPIRY_MARGIN < datetime.now(UTC):
            return None
        return _Session(url, expiration)

    async def _create_session(
        self,
        target: DeliveryTarget,
        drive: str,
        components: list[str],
        size: int,
        checkpoint: CheckpointStore,
        budget: RetryBudget,
    ) -> _Session:
        url = item_url(self.settings.base_url, drive, components, "createUploadSession")
        body = {"item": {"@microsoft.graph.conflictBehavior": target.conflict, "fileSize": size}}
        while True:
            if budget.cancel is not None and budget.cancel.is_set():
                raise DeliveryCanceled("delivery canceled")
            try:
                response = await self._graph.post(url, json=body, extensions=dict(GRAPH_EXTENSIONS))
            except httpx.TransportError as exc:
                await budget.wait(f"createUploadSession failed ({type(exc).__name__})")
                continue
            status = response.status_code
            if status == 200 or status == 201:
                payload = response_json(response)
                upload_url = payload.get("uploadUrl")
                if not isinstance(upload_url, str) or not upload_url.startswith(
                    ("https://", "http://")
                ):
                    raise DestinationUnavailable("createUploadSession returned no usable uploadUrl")
                session = _Session(upload_url, parse_expiration(payload.get("expirationDateTime")))
                # Recorded before the first byte: whoever retries resumes this session.
                await checkpoint.save(target.key, self._state(session, target, drive, size, 0))
                budget.reset()
                return session
            if status == 409:
                raise DeliveryConflict(f"{components[-1]!r} already exists")
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(f"createUploadSession: HTTP {status}", retry_after=retry_after)
                continue
            raise rejected(response, "createUploadSession")

    @staticmethod
    def _state(
        session: _Session, target: DeliveryTarget, drive: str, size: int, done: int
    ) -> dict[str, Any]:
        return {
            "kind": _CHECKPOINT_KIND,
            "upload_url": session.url,
            "expiration": session.expiration.isoformat() if session.expiration else None,
            "path": target.path,
            "drive": drive,
            "size": size,
            "conflict": target.conflict,
            "bytes_done": done,
        }

    async def _discard(
        self, session: _Session | None, checkpoint: CheckpointStore, key: str
    ) -> None:
        """After a final failure or cancel: delete the session (best effort) and the record."""
        if session is not None:
            await self._delete_session_quietly(session.url)
        await checkpoint.delete(key)

    async def _delete_session(self, url: str, budget: RetryBudget) -> None:
        while True:
            try:
                response = await self._upload.delete(url)
            except httpx.TransportError as exc:
                await budget.wait(f"deleting the upload session failed ({type(exc).__name__})")
                continue
            if response.status_code in (200, 202, 204, 404):
                return
            if response.status_code == 429 or response.status_code >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                await budget.wait(
                    f"deleting the upload session: HTTP {response.status_code}",
                    retry_after=retry_after,
                )
                continue
            raise rejected(response, "deleting the upload session")

    async def _delete_session_quietly(self, url: str) -> None:
        # Best effort: an undeleted session only costs temporary space until it expires.
        budget = RetryBudget(
            max_attempts=2,
            backoff_initial=self.settings.backoff_initial,
            backoff_max=self.settings.backoff_initial,
            max_retry_after=1.0,
            cancel=None,
        )
        try:
            await self._delete_session(url, budget)
        except DeliveryError:
            pass

    # -- verification ----------------------------------------------------------------------

    async def _same_file(
        self, drive: str, components: list[str], size: int, digests: _Digests
    ) -> dict[str, Any] | None:
        """The existing item at the path if it holds exactly our bytes (a redelivery), else None."""
        url = item_url(self.settings.base_url, drive, components)
        try:
            response = await self._graph.get(url, extensions=dict(GRAPH_EXTENSIONS))
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        item = response_json(response)
        hashes = (item.get("file") or {}).get("hashes") or {}
        sha = hashes.get("sha256Hash")
        quickxor = hashes.get("quickXorHash")
        if item.get("size") != size or digests.upto != size:
            return None
        if isinstance(sha, str) and sha.lower() == digests.sha256.hexdigest():
            return item
        if isinstance(quickxor, str) and quickxor == digests.quickxor.b64digest():
            return item
        return None

    @staticmethod
    def _check_declared(target: DeliveryTarget, digests: _Digests) -> None:
        if target.sha256 is not None and digests.sha256.hexdigest() != target.sha256:
            raise ChecksumMismatch(
                f"sha256 of the source is {digests.sha256.hexdigest()}, expected {target.sha256}"
            )

    @staticmethod
    def _verify_item(item: dict[str, Any], size: int, digests: _Digests) -> None:
        """Compare the driveItem Graph returned with what we sent."""
        if item.get("size") not in (None, size):
            raise ChecksumMismatch(
                f"OneDrive stored {item.get('size')} bytes, sent {size}", retryable=True
            )
        hashes = (item.get("file") or {}).get("hashes") or {}
        sha = hashes.get("sha256Hash")
        quickxor = hashes.get("quickXorHash")
        if isinstance(sha, str) and sha.lower() != digests.sha256.hexdigest():
            raise ChecksumMismatch(
                "OneDrive's sha256Hash differs from the bytes sent", retryable=True
            )
        if isinstance(quickxor, str) and quickxor != digests.quickxor.b64digest():
            raise ChecksumMismatch(
                "OneDrive's quickXorHash differs from the bytes sent", retryable=True
            )

    def _drive_for(self, target: DeliveryTarget) -> str:
        selector = target.drive or self.settings.drive
        if "{owner}" in selector:
            if not target.owner:
                raise InvalidTarget(f"drive {selector!r} needs the owner, and the upload has none")
            selector = selector.replace("{owner}", target.owner)
        try:
            return drive_path(selector)
        except ValueError as exc:
            raise InvalidTarget(str(exc)) from exc

    def _budget(self, cancel: asyncio.Event | None) -> RetryBudget:
        return RetryBudget(
            max_attempts=self.settings.max_attempts,
            backoff_initial=self.settings.backoff_initial,
            backoff_max=self.settings.backoff_max,
            max_retry_after=self.settings.max_retry_after,
            cancel=cancel,
        )
