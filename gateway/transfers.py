"""Server-side transfers (SPEC §3.4): an S3 object, a URL or a finished upload into a
destination, answered at once with a transfer id and followed like an upload.

    POST   /transfers               -> 202 + Location + Progress-Location + status JSON
    GET    /transfers?state=&limit= -> the caller's transfers, newest first
    GET    /transfers/{id}          -> status
    GET    /transfers/{id}/progress -> SSE / WebSocket, as for uploads
    DELETE /transfers/{id}          -> cancel (idempotent)

A transfer is an event: `transfer.requested` goes through the outbox and processing handles it
with the same steps and destinations as an upload. Its status lives in the same KV projection,
under `transfer.<id>`; the initial status is written at once so a GET right after the POST
finds it. Transfers need NATS: without it these endpoints answer 503.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from aiohttp import web

from events.model import (
    S3Source,
    TransferCanceled,
    TransferRequested,
    TransferSource,
    UploadSource,
    UrlSource,
    from_timestamp,
)
from gateway.auth import request_owner
from gateway.events_lifecycle import EventLifecycle
from gateway.progress import STATUS, stream_status
from gateway.status import RANK, TERMINAL
from gateway.status_store import StatusStore
from gateway.store.base import UploadGone, UploadNotFound
from gateway.tus.context import TUS, base_url
from gateway.tus.headers import valid_upload_id

__all__ = ["add_transfer_routes", "parse_transfer_request"]

MAX_BODY = 64 * 1024
MAX_TEXT = 1024
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
CONFLICTS = ("fail", "replace", "rename")
_TRANSFER_ID = re.compile(r"^tr_[0-9a-f]{32}\Z")
SOURCE = "/tusgate/gateway"


class BadRequest(Exception):
    """A request body that does not validate; `field` names the bad member."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/problem+json"
    )


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(field, "must be an object")
    return value


def _text(value: Any, field: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(field, "must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise BadRequest(field, f"longer than {MAX_TEXT} characters")
    return value


def _one_of(obj: dict[str, Any], field: str, kinds: tuple[str, ...]) -> str:
    present = [k for k in obj if k in kinds]
    unknown = [k for k in obj if k not in kinds]
    if unknown:
        raise BadRequest(f"{field}.{unknown[0]}", f"unknown; expected one of {', '.join(kinds)}")
    if len(present) != 1:
        raise BadRequest(field, f"must have exactly one of {', '.join(kinds)}")
    return present[0]


def _relative_path(value: Any, field: str) -> str:
    path = _text(value, field)
    assert path is not None
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BadRequest(field, "must be a path inside the destination, without '..'")
    return "/" + "/".join(parts)


def parse_source(value: Any) -> TransferSource:
    source = _object(value, "source")
    kind = _one_of(source, "source", ("s3", "url", "upload"))
    if kind == "s3":
        s3 = _object(source["s3"], "source.s3")
        bucket = _text(s3.get("bucket"), "source.s3.bucket")
        key = _text(s3.get("key"), "source.s3.key")
        assert bucket is not None and key is not None
        return S3Source(bucket=bucket, key=key)
    if kind == "url":
        url = _text(source["url"], "source.url")
        assert url is not None
        if not re.match(r"^https?://[^/\s]+", url):
            raise BadRequest("source.url", "must be an absolute http(s) URL")
        return UrlSource(url=url)
    upload_id = _text(source["upload"], "source.upload")
    if upload_id is None or not valid_upload_id(upload_id):
        raise BadRequest("source.upload", "is not an upload id")
    return UploadSource(upload_id=upload_id)


def parse_destination(value: Any) -> dict[str, Any]:
    destination = _object(value, "destination")
    kind = _one_of(destination, "destination", ("onedrive", "local"))
    spec = _object(destination[kind], f"destination.{kind}")
    path = _relative_path(spec.get("path"), f"destination.{kind}.path")
    if kind == "local":
        return {"local": {"path": path}}
    conflict = spec.get("conflict", "fail")
    if conflict not in CONFLICTS:
        raise BadRequest("destination.onedrive.conflict", f"must be one of {', '.join(CONFLICTS)}")
    drive = _text(spec.get("drive"), "destination.onedrive.drive", required=False)
    return {"onedrive": {"drive": drive or "me", "path": path, "conflict": conflict}}


def parse_transfer_request(body: Any, *, transfer_id: str, owner: str) -> TransferRequested:
    request = _object(body, "body")
    unknown = set(request) - {"source", "destination", "description", "delete_source"}
    if unknown:
        raise BadRequest(min(unknown), "unknown member")
    source = parse_source(request.get("source"))
    delete_source = request.get("delete_source", False)
    if not isinstance(delete_source, bool):
        raise BadRequest("delete_source", "must be true or false")
    if delete_source and not isinstance(source, S3Source):
        raise BadRequest("delete_source", "only an S3 source can be deleted")
    return TransferRequested(
        event_source=SOURCE,
        transfer_id=transfer_id,
        source=source,
        destination=parse_destination(request.get("destination")),
        owner=owner,
        description=_text(request.get("description"), "description", required=False),
        delete_source=delete_source,
    )


def transfer_view(status: dict[str, Any]) -> dict[str, Any]:
    """The public JSON of a transfer (SPEC §3.4) from its projected status."""
    processing = status.get("processing") or {}
    transfer = status.get("transfer") or {}
    state = status.get("state")
    return {
        "id": status.get("id"),
        "state": state,
        "source": transfer.get("source"),
        "destination": transfer.get("destination"),
        "description": transfer.get("description"),
        "bytes_done": processing.get("bytes_done", 0),
        "bytes_total": processing.get("bytes_total"),
        "percent": processing.get("percent", 0.0),
        "created_at": status.get("created_at"),
        "started_at": status.get("started_at"),
        "finished_at": status.get("updated_at") if state in TERMINAL else None,
        "updated_at": status.get("updated_at"),
        "result": status.get("result"),
        "error": status.get("error"),
    }


def _context(request: web.Request) -> tuple[StatusStore, EventLifecycle]:
    store = request.app[STATUS]
    lifecycle = request.app[TUS].lifecycle
    if store is None or not isinstance(lifecycle, EventLifecycle):
        raise web.HTTPServiceUnavailable(text="transfers need NATS (TUSGATE_NATS_URL)\n")
    return store, lifecycle


async def _owned_status(request: web.Request) -> tuple[str, dict[str, Any]]:
    """The transfer's status if the caller owns it; 404 otherwise (ids must not leak)."""
    store, _ = _context(request)
    transfer_id = request.match_info["transfer_id"]
    status = await store.get(f"transfer.{transfer_id}") if _TRANSFER_ID.match(transfer_id) else None
    if status is None or status.get("owner") != request_owner(request):
        raise web.HTTPNotFound(text="transfer not found\n")
    return transfer_id, status


async def create_transfer(request: web.Request) -> web.StreamResponse:
    store, lifecycle = _context(request)
    if request.content_type != "application/json":
        return problem(415, "Unsupported Media Type", "send the transfer as application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return problem(413, "Payload Too Large", f"a transfer request is at most {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return problem(413, "Payload Too Large", f"a transfer request is at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return problem(400, "Bad Request", "body: not valid JSON", field="body")
    transfer_id = "tr_" + secrets.token_hex(16)
    owner = request_owner(request)
    try:
        event = parse_transfer_request(body, transfer_id=transfer_id, owner=owner)
        if isinstance(event.source, UploadSource):
            await _check_upload_source(request, event.source.upload_id, owner)
    except BadRequest as exc:
        return problem(400, "Bad Request", str(exc), field=exc.field)
    # The initial status first (a GET right after this answer finds it), then the event.
    status = await store.apply(f"transfer.{transfer_id}", event)
    await lifecycle.outbox.record(event)
    location = f"/transfers/{transfer_id}"
    headers = {
        "Location": location,
        "Progress-Location": f"{base_url(request, request.app[TUS].settings)}{location}/progress",
    }
    return web.json_response(transfer_view(status), status=202, headers=headers)


async def _check_upload_source(request: web.Request, upload_id: str, owner: str) -> None:
    try:
        info = await request.app[TUS].store.core.get_info(upload_id)
    except (UploadNotFound, UploadGone):
        raise BadRequest("source.upload", "no such upload") from None
    if info.owner != owner:
        raise BadRequest("source.upload", "no such upload")
    if not info.is_complete:
        raise BadRequest("source.upload", "the upload is not complete")


async def get_transfer(request: web.Request) -> web.StreamResponse:
    _, status = await _owned_status(request)
    return web.json_response(transfer_view(status), headers={"Cache-Control": "no-store"})


async def transfer_progress(request: web.Request) -> web.StreamResponse:
    transfer_id, status = await _owned_status(request)
    return await stream_status(request, f"transfer.{transfer_id}", status)


async def cancel_transfer(request: web.Request) -> web.StreamResponse:
    """Idempotent: canceling a canceled transfer is a success; a finished one cannot be."""
    transfer_id, status = await _owned_status(request)
    store, lifecycle = _context(request)
    state = status.get("state")
    if state == "canceled":
        return web.json_response(transfer_view(status), status=200)
    if state in TERMINAL:
        return problem(409, "Conflict", f"the transfer already {state}")
    event = TransferCanceled(event_source=SOURCE, transfer_id=transfer_id, at=from_timestamp(time.time()))
    status = await store.apply(f"transfer.{transfer_id}", event)
    await lifecycle.outbox.record(event)  # processing stops the delivery and deletes its session
    return web.json_response(transfer_view(status), status=202)


async def list_transfers(request: web.Request) -> web.StreamResponse:
    store, _ = _context(request)
    state = request.query.get("state")
    if state is not None and state not in RANK:
        return problem(400, "Bad Request", f"state: one of {', '.join(RANK)}", field="state")
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
    except ValueError:
        return problem(400, "Bad Request", "limit: must be an integer", field="limit")
    if not 1 <= limit <= MAX_LIMIT:
        return problem(400, "Bad Request", f"limit: between 1 and {MAX_LIMIT}", field="limit")
    owner = request_owner(request)
    statuses = [
        s for s in await store.list("transfer.")
        if s.get("owner") == owner and (state is None or s.get("state") == state)
    ]
    statuses.sort(key=lambda s: s.get("created_at") or "", reverse=True)
    return web.json_response({"transfers": [transfer_view(s) for s in statuses[:limit]]})


def add_transfer_routes(app: web.Application) -> None:
    app.router.add_post("/transfers", create_transfer)
    app.router.add_get("/transfers", list_transfers)
    app.router.add_get("/transfers/{transfer_id}", get_transfer)
    app.router.add_delete("/transfers/{transfer_id}", cancel_transfer)
    app.router.add_get("/transfers/{transfer_id}/progress", transfer_progress)
