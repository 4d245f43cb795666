"""OneDrive destination: Microsoft Graph, simple upload for small files, sessions for the rest.

Small files (< ``simple_upload_max``, 4 MiB, including empty files, which a session cannot
carry) go up in one ``PUT {drive}/root:/{path}:/content`` with the conflict behaviour as the
``@microsoft.graph.conflictBehavior`` query parameter. Larger ones go through an upload session
and our own fragment loop (:mod:`.upload_session`; not msgraph-core's LargeFileUploadTask,
which needs the whole file in a BytesIO, swallows fragment errors and sends the bearer token to
the uploadUrl).

Checks: the sha256 of the bytes read is compared with the declared one before the file is
committed, and the driveItem's ``sha256Hash``/``quickXorHash`` with what was sent afterwards.

Exactly one file: a redelivered event resumes the recorded session; with ``conflict=fail`` an
existing item holding exactly our bytes counts as delivered (a redelivery after success).
Known limit: with ``conflict=rename``, if the commit succeeded but its answer was lost, the
retry cannot tell its own file from an older one and may add ``name 1.ext``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from processing.sources import ByteSource, SourceError, read_range

from .base import CheckpointStore, DeliveryResult, DeliveryTarget, ProgressCallback
from .digests import Digests
from .errors import (
    DeliveryCanceled,
    DeliveryConflict,
    DestinationRejected,
    DestinationUnavailable,
    InvalidTarget,
    SourceFailed,
)
from .graph_auth import BearerAuth, TokenProvider
from .graph_http import (
    RetryBudget,
    create_graph_client,
    create_upload_client,
    drive_path,
    graph_extensions,
    item_url,
    parse_retry_after,
    rejected,
    response_json,
)
from .manifest import Manifest, manifest_path
from .paths import split_target_path
from .upload_session import SessionApi, SessionUpload

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
    #: Files smaller than this (bytes, at most 4 MiB) use one simple upload; 0 sends every
    #: non-empty file through a session.
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
        self._sessions = SessionApi(graph_client, upload_client)

    async def aclose(self) -> None:
        for client in self._owned:
            await client.aclose()
        self._owned.clear()

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
        digests = Digests(source)

        async def find_same() -> dict[str, Any] | None:
            return await self._same_file(drive, components, digests)

        try:
            # An empty file cannot go through a session (no byte range to PUT).
            if source.size == 0 or source.size < self.settings.simple_upload_max:
                item = await self._simple_upload(source, target, drive, components, budget, digests)
            else:
                item = await SessionUpload(
                    self._sessions,
                    source=source,
                    target=target,
                    drive=drive,
                    create_url=item_url(
                        self.settings.base_url, drive, components, "createUploadSession"
                    ),
                    fragment_size=self.settings.fragment_size,
                    max_restarts=self.settings.max_session_restarts,
                    checkpoint=checkpoint,
                    progress=progress,
                    budget=budget,
                    digests=digests,
                    find_same=find_same,
                ).run()
        except SourceError as exc:
            raise SourceFailed(exc.message, retryable=exc.retryable, code=exc.code) from exc
        except httpx.InvalidURL as exc:
            raise InvalidTarget(f"cannot build a Graph URL: {exc}") from exc
        except httpx.HTTPError as exc:
            raise DestinationUnavailable(f"Graph request failed: {exc}") from exc
        # The session, if any, is complete: nothing left to resume.
        await checkpoint.delete(target.key)
        digests.verify(item)
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
        """DELETE the recorded session, then forget it (idempotent).

        Raises a retryable error, keeping the record, when Graph cannot be reached; a session
        Graph refuses to delete is forgotten (it expires on its own).
        """
        state = await checkpoint.load(key)
        url = state.get("upload_url") if state else None
        if isinstance(url, str) and url:
            try:
                await self._sessions.delete(url, self._budget(None))
            except DestinationRejected:
                pass
            except httpx.HTTPError as exc:
                raise DestinationUnavailable(f"cannot delete the upload session: {exc}") from exc
        await checkpoint.delete(key)

    async def write_manifest(self, result: DeliveryResult, manifest: Manifest) -> str:
        """Upload ``<name>.manifest.json`` beside the delivered file (simple upload, replace)."""
        relative = manifest_path(result.path)
        components = split_target_path(relative)
        prefix, marker = "onedrive:", "/root:/"
        if result.destination.startswith(prefix) and marker in result.destination:
            drive = result.destination[len(prefix) : result.destination.index(marker)]
        else:
            drive = drive_path(self.settings.drive)
        url = item_url(self.settings.base_url, drive, components, "content")
        try:
            await self._put_content(
                f"{url}?@microsoft.graph.conflictBehavior=replace",
                manifest.to_json(),
                "application/json",
                self._budget(None),
            )
        except httpx.HTTPError as exc:
            raise DestinationUnavailable(f"Graph request failed: {exc}") from exc
        return relative

    async def _simple_upload(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        drive: str,
        components: list[str],
        budget: RetryBudget,
        digests: Digests,
    ) -> dict[str, Any]:
        data = await read_range(source, 0, source.size)
        digests.feed(0, data)
        digests.check_declared(target.sha256)
        url = item_url(self.settings.base_url, drive, components, "content")
        # PUT content takes the conflict behaviour as a query parameter (default: replace).
        # `rename` is tried as `fail` first: a PUT whose answer was lost and that is sent
        # again would otherwise store the file twice (``name.ext`` and ``name 1.ext``).
        first = "fail" if target.conflict == "rename" else target.conflict
        try:
            return await self._put_content(
                f"{url}?@microsoft.graph.conflictBehavior={first}",
                data,
                target.content_type,
                budget,
            )
        except DeliveryConflict:
            existing = await self._same_file(drive, components, digests)
            if existing is not None:
                return existing
            if target.conflict != "rename":
                raise
        return await self._put_content(
            f"{url}?@microsoft.graph.conflictBehavior=rename", data, target.content_type, budget
        )

    async def _put_content(
        self, url: str, data: bytes, content_type: str, budget: RetryBudget
    ) -> dict[str, Any]:
        while True:
            budget.check_cancel()
            try:
                response = await self._graph.put(
                    url,
                    content=data,
                    headers={"Content-Type": content_type},
                    extensions=graph_extensions(),
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

    async def _same_file(
        self, drive: str, components: list[str], digests: Digests
    ) -> dict[str, Any] | None:
        """The item at the path if it holds exactly our bytes (a redelivery), else None."""
        try:
            response = await self._graph.get(
                item_url(self.settings.base_url, drive, components), extensions=graph_extensions()
            )
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        item = response_json(response)
        if item.get("size") != digests.source.size:
            return None
        await digests.catch_up(digests.source.size)  # the whole source, only when sizes match
        return item if digests.matches(item) else None

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
