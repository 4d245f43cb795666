"""A job: one upload or transfer to process, built from the event that asked for it.

The pipeline sees jobs only, never events: an upload (``upload.bytes-received``) and a
server-side transfer (``transfer.requested``) differ in where the bytes come from and where
they go, not in how they are checked and delivered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from events.model import (
    Event,
    Storage,
    TransferRequested,
    TransferSource,
    UploadBytesReceived,
)
from processing.errors import ProcessingError

__all__ = ["Job", "JobKind", "job_from_event"]

JobKind = Literal["upload", "transfer"]


@dataclass(frozen=True, kw_only=True)
class Job:
    """What processing knows about one upload or transfer."""

    id: str
    kind: JobKind
    owner: str
    #: Bytes expected (from the event); the source's own size is checked against it.
    size: int | None
    filename: str | None = None
    #: The content type the client declared (metadata ``filetype``); not verified.
    declared_type: str | None = None
    metadata: Mapping[str, str | None] = field(default_factory=dict)
    #: Digests computed while receiving (algorithm → lowercase hex).
    checksums: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    #: Where an upload's bytes are staged (None for a transfer).
    storage: Storage | None = None
    #: Where a transfer's bytes come from (None for an upload).
    transfer_source: TransferSource | None = None
    #: A transfer's requested destination (``{"local": {...}}`` / ``{"onedrive": {...}}``);
    #: None: the configured destination and path template.
    destination: Mapping[str, Any] | None = None
    #: A transfer's ``delete_source``: delete the S3 object once the delivery is recorded.
    delete_source: bool = False

    @property
    def source(self) -> dict[str, Any]:
        """Where the bytes came from, in the transfer API's shape (for manifests and hooks)."""
        if self.transfer_source is not None:
            return self.transfer_source.to_json()
        return {"upload": self.id}

    @property
    def sha256(self) -> str | None:
        return self.checksums.get("sha256")

    def facts(self) -> dict[str, Any]:
        """The job as JSON, for hooks and logs (no secrets: there are none in a job)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "owner": self.owner,
            "size": self.size,
            "filename": self.filename,
            "content_type": self.declared_type,
            "metadata": dict(self.metadata),
            "checksums": dict(self.checksums),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "source": self.source,
            "storage": self.storage.to_json() if self.storage is not None else None,
        }


def job_from_event(event: Event) -> Job:
    """The job an event asks for; ProcessingError (not retryable) for any other event."""
    if isinstance(event, UploadBytesReceived):
        return Job(
            id=event.upload_id,
            kind="upload",
            owner=event.owner,
            size=event.size,
            filename=event.filename,
            declared_type=event.content_type,
            metadata=dict(event.metadata),
            checksums={k.lower(): v.lower() for k, v in event.checksums.items()},
            created_at=event.created_at,
            storage=event.storage,
        )
    if isinstance(event, TransferRequested):
        return Job(
            id=event.transfer_id,
            kind="transfer",
            owner=event.owner,
            size=None,
            transfer_source=event.source,
            destination=dict(event.destination),
            created_at=event.event_time,
            delete_source=event.delete_source,
        )
    raise ProcessingError(f"{event.type} is not a processing job", code="not_a_job")
