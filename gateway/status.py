"""The status of an upload (SPEC §3.3), as a pure fold over its events.

    receiving -> received -> processing -> finalizing -> succeeded | failed
    terminated, expired: terminal too

`apply_event` never moves a status backwards and never leaves a terminal state, so events may be
applied more than once or slightly out of order (at-least-once delivery, several projector
instances) and the result is still right.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from events.model import (
    Event,
    ProcessingAborted,
    ProcessingFinished,
    ProcessingProgress,
    ProcessingStarted,
    ProcessingStepFinished,
    TransferCanceled,
    TransferRequested,
    UploadBytesReceived,
    UploadCreated,
    UploadExpired,
    UploadProgress,
    UploadTerminated,
)

__all__ = ["RANK", "TERMINAL", "apply_event", "event_key", "is_terminal"]

RANK = {
    "requested": 0,
    "receiving": 0,
    "received": 1,
    "processing": 2,
    "finalizing": 3,
    "succeeded": 4,
    "failed": 4,
    "terminated": 4,
    "expired": 4,
    "canceled": 4,
}
TERMINAL = frozenset(s for s, r in RANK.items() if r == 4)


def is_terminal(status: dict[str, Any] | None) -> bool:
    return status is not None and status.get("state") in TERMINAL


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def event_key(event: Event) -> str | None:
    """The status key an event belongs to: `upload.<id>` or `transfer.<id>`."""
    if isinstance(event, TransferRequested | TransferCanceled):
        return f"transfer.{event.transfer_id}"
    upload_id = getattr(event, "upload_id", None)
    if upload_id:
        return f"upload.{upload_id}"
    event_id = getattr(event, "id", None)
    kind = getattr(event, "kind", None)
    if event_id:
        # processing.* events carry `id`; transfers' ids are prefixed so both share one space.
        return f"{'transfer' if kind == 'transfer' or str(event_id).startswith('tr_') else 'upload'}.{event_id}"
    return None


def _blank(event_id: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "state": "receiving",
        "offset": 0,
        "length": None,
        "metadata": {},
        "owner": None,
        "created_at": None,
        "updated_at": None,
        "expires_at": None,
        "started_at": None,
        "processing": None,
        "result": None,
        "error": None,
        "last_event": None,
    }


def _advance(status: dict[str, Any], state: str) -> None:
    if status["state"] in TERMINAL:
        return
    if RANK[state] >= RANK[status["state"]]:
        status["state"] = state


def apply_event(status: dict[str, Any] | None, event: Event) -> dict[str, Any]:
    """The status after `event` (a new dict; the input is not changed)."""
    key = event_key(event) or ""
    new = dict(status) if status is not None else _blank(key.split(".", 1)[-1])
    if status is None and isinstance(event, TransferRequested):
        new["state"] = "requested"
    new["updated_at"] = _iso(event.event_time)
    new["last_event"] = event.type
    match event:
        case UploadCreated():
            new.update(
                length=event.size, metadata=event.metadata, owner=event.owner,
                created_at=_iso(event.created_at), expires_at=_iso(event.expires_at),
            )
        case UploadProgress():
            new["offset"] = max(new["offset"] or 0, event.offset)
            if event.size is not None:
                new["length"] = event.size
        case UploadBytesReceived():
            new.update(offset=event.size, length=event.size, expires_at=None)
            new["metadata"] = new["metadata"] or event.metadata
            new["owner"] = new["owner"] or event.owner
            _advance(new, "received")
        case ProcessingStarted():
            _advance(new, "processing")
            new["started_at"] = new.get("started_at") or _iso(event.event_time)
            new["processing"] = {**(new["processing"] or {}), "step": "processing", "attempt": event.attempt}
        case ProcessingStepFinished():
            _advance(new, "processing")
            new["processing"] = {**(new["processing"] or {}), "step": event.step}
        case ProcessingProgress():
            _advance(new, event.step)
            previous = (new["processing"] or {}).get("percent") or 0
            if new["state"] == event.step:
                new["processing"] = {
                    "step": event.step,
                    "bytes_done": event.bytes_done,
                    "bytes_total": event.bytes_total,
                    "percent": max(previous, event.percent or 0) if event.step == "finalizing" else event.percent,
                }
        case ProcessingFinished():
            _advance(new, "succeeded")
            if new["state"] == "succeeded":
                new["result"] = {
                    "destination": event.destination, "item_id": event.item_id,
                    "web_url": event.web_url, "size": event.size,
                    "sha256": getattr(event, "sha256", None),
                }
                done = {"step": "finalizing", "bytes_done": event.size, "bytes_total": event.size, "percent": 100.0}
                new["processing"] = done
        case ProcessingAborted():
            _advance(new, "failed")
            if new["state"] == "failed":
                new["error"] = {"code": event.code, "message": event.message, "retryable": event.retryable}
        case UploadTerminated():
            _advance(new, "terminated")
        case UploadExpired():
            _advance(new, "expired")
        case TransferRequested():
            new.update(owner=event.owner, created_at=new["created_at"] or _iso(event.event_time))
            new["transfer"] = {"source": event.to_envelope()["data"]["source"],
                               "destination": event.destination, "description": event.description}
        case TransferCanceled():
            _advance(new, "canceled")
    return new
