"""Hooks at the moments of an upload's life that the outside world must hear about.

The TUS handlers call these; by default they do nothing (a pure TUS server). The events layer
replaces them with hooks that record events in the outbox and wait for processing outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.store.base import UploadInfo

__all__ = ["Completion", "Lifecycle"]


@dataclass(frozen=True)
class Completion:
    """How to answer the request that delivered an upload's last byte."""

    status: int | None = None  # None: the method's usual success status (204 PATCH, 201 POST)
    accepted: bool = False  # processing goes on: 202 for a PATCH (a POST stays 201, SPEC §3.2)
    headers: dict[str, str] = field(default_factory=dict)
    problem: dict[str, Any] | None = None  # an application/problem+json body (422)


class Lifecycle:
    # Whether `completed` needs the upload's checksums. Hashing costs ~0.6 CPU-s per GiB, so a
    # gateway without events (nobody to tell) does not compute them.
    wants_checksums = False
    async def created(self, request: web.Request, info: UploadInfo) -> None:
        """A new upload exists."""

    async def progress(self, info: UploadInfo, *, request_ended: bool) -> None:
        """Bytes arrived; called at most ~once a second while receiving, and when a request ends."""

    async def completed(
        self, request: web.Request | None, info: UploadInfo, checksums: dict[str, str]
    ) -> Completion:
        """The last byte is stored. Returns how to answer the completing request (None when the
        upload completed in the background, as a final upload of unfinished partials does)."""
        return Completion()

    async def terminated(self, info: UploadInfo) -> None:
        """The client deleted the upload."""

    async def expired(self, info: UploadInfo) -> None:
        """The sweeper discarded an unfinished upload."""
