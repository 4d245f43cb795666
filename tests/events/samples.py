"""One realistic instance of every event type, shared by the events tests."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from events.model import (
    Event,
    FileStorage,
    ProcessingAborted,
    ProcessingFinished,
    ProcessingProgress,
    ProcessingStarted,
    ProcessingStepFinished,
    S3Source,
    S3Storage,
    TransferCanceled,
    TransferRequested,
    UploadBytesReceived,
    UploadCreated,
    UploadExpired,
    UploadProgress,
    UploadSource,
    UploadTerminated,
    UrlSource,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def new_id() -> str:
    return secrets.token_hex(16)


def one_of_each(upload_id: str | None = None, transfer_id: str | None = None) -> list[Event]:
    uid = upload_id or new_id()
    tid = transfer_id or new_id()
    meta: dict[str, str | None] = {
        "filename": "report.pdf",
        "filetype": "application/pdf",
        "x": None,
    }
    return [
        UploadCreated(
            upload_id=uid, size=1024, metadata=meta, owner="alice", is_partial=False,
            is_final=False, partial_uploads=(), created_at=T0, expires_at=T0 + timedelta(days=1),
        ),
        UploadProgress(upload_id=uid, offset=512, size=1024, bytes_per_second=1e6),
        UploadBytesReceived(
            upload_id=uid, size=1024, metadata=meta, owner="alice",
            storage=FileStorage(path=f"/data/uploads/{uid}"),
            checksums={"sha256": SHA256, "md5": "d41d8cd98f00b204e9800998ecf8427e"},
            content_type="application/pdf", filename="report.pdf",
            created_at=T0, completed_at=T0 + timedelta(seconds=3),
        ),
        UploadTerminated(upload_id=uid, at=T0),
        UploadExpired(upload_id=uid, at=T0),
        ProcessingStarted(id=uid, kind="upload", attempt=1, worker="worker-1"),
        ProcessingStepFinished(id=uid, step="checksum", ok=True, detail="sha256 matches"),
        ProcessingProgress(
            id=uid, step="finalizing", bytes_done=512, bytes_total=1024, percent=50.0
        ),
        ProcessingFinished(
            id=uid, destination={"onedrive": {"drive": "b!abc", "path": "/alice/report.pdf"}},
            item_id="01ABCDEF", web_url="https://contoso.sharepoint.com/report.pdf", size=1024,
            sha256=SHA256,
        ),
        ProcessingAborted(id=uid, code="checksum_mismatch", message="sha256 differs",
                          retryable=False),
        TransferRequested(
            transfer_id=tid, source=S3Source(bucket="in", key="a/b.bin"),
            destination={"onedrive": {"drive": "me", "path": "/in/b.bin", "conflict": "rename"}},
            owner="alice", description="nightly export", delete_source=True,
        ),
        TransferCanceled(transfer_id=tid, at=T0),
    ]  # fmt: skip


# Variants of the nested unions, for round-trip tests.
VARIANTS: list[Event] = [
    UploadBytesReceived(
        upload_id="u1", size=0, metadata={}, owner="anonymous",
        storage=S3Storage(bucket="staging", key="uploads/u1", endpoint_url="http://127.0.0.1:9000"),
        checksums={}, content_type=None, filename=None, created_at=T0, completed_at=T0,
    ),
    UploadCreated(
        upload_id="u2", size=None, metadata={}, owner="bob", is_partial=False, is_final=True,
        partial_uploads=("p1", "p2"), created_at=T0, expires_at=None,
    ),
    TransferRequested(transfer_id="t1", source=UrlSource(url="https://example.com/f"),
                      destination={"local": {"path": "/out/f"}}, owner="bob"),
    TransferRequested(transfer_id="t2", source=UploadSource(upload_id="u1"),
                      destination={"local": {"path": "/out/u1"}}, owner="bob"),
    UploadProgress(upload_id="u3", offset=0, size=None),
    ProcessingProgress(id="u3", step="processing", bytes_done=0, bytes_total=None, percent=None),
]  # fmt: skip
