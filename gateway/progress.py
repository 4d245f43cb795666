"""GET /files/{id}/status and GET /files/{id}/progress (SSE, or WebSocket on upgrade).

The progress stream starts with the current status, then sends every change of it (each change
is caused by one event: `last_event` names it) until a terminal state, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from events.tasks import stop_task
from gateway import errors
from gateway.status import RANK, is_terminal
from gateway.status_store import StatusStore
from gateway.store.base import UploadGone, UploadInfo
from gateway.tus.context import TUS, TusContext

__all__ = ["STATUS", "add_progress_routes", "status_from_info", "stream_status"]

STATUS: web.AppKey[StatusStore | None] = web.AppKey("status", StatusStore)
KEEPALIVE = 15.0  # seconds between SSE comments, so proxies keep an idle stream open


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def status_from_info(ctx: TusContext, info: UploadInfo) -> dict[str, Any]:
    """What the store alone knows, for when no event has been projected (yet)."""
    return {
        "id": info.id,
        "state": "received" if info.is_complete else "receiving",
        "offset": info.offset,
        "length": info.size,
        "metadata": info.metadata,
        "owner": info.owner,
        "created_at": _iso(info.created_at),
        "updated_at": _iso(info.updated_at),
        "expires_at": _iso(ctx.expires_at(info)),
        "processing": None,
        "result": None,
        "error": None,
    }


async def current_status(request: web.Request) -> tuple[str, dict[str, Any]]:
    ctx = request.app[TUS]
    upload_id = ctx.upload_id(request)
    store = request.app[STATUS]
    status = await store.get(f"upload.{upload_id}") if store is not None else None
    if status is None or RANK.get(status.get("state", ""), 0) < RANK["received"]:
        # The projection may lag behind the store by a few milliseconds: the store knows
        # best how many bytes arrived, the projection knows everything after that.
        try:
            info = await ctx.store.core.get_info(upload_id)
        except UploadGone as exc:
            if status is None:
                status = {"id": upload_id, "state": exc.reason}
        else:
            known = status_from_info(ctx, info)
            if status is None:
                status = known
            elif RANK[known["state"]] > RANK.get(status.get("state", ""), 0) or known["offset"] > (status.get("offset") or 0):
                status = {**status, "state": known["state"], "offset": known["offset"], "length": known["length"]}
    if status is None:
        raise errors.NOT_FOUND.error()
    return upload_id, status


async def handle_status(request: web.Request) -> web.StreamResponse:
    _, status = await current_status(request)
    status.pop("last_event", None)
    return web.json_response(status, headers={"Cache-Control": "no-store"})


async def _updates(request: web.Request, key: str, first: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    yield first
    store = request.app[STATUS]
    if is_terminal(first) or store is None:
        return
    sent = first
    async for status in store.watch(key):
        if status == sent:
            continue  # the watch starts by repeating the current value
        # A projection older than what was already sent is skipped: the stream never goes back.
        if RANK.get(status.get("state", ""), 0) < RANK.get(sent.get("state", ""), 0):
            continue
        if status.get("state") == sent.get("state") and (status.get("offset") or 0) < (sent.get("offset") or 0):
            continue
        sent = status
        yield status


async def handle_progress(request: web.Request) -> web.StreamResponse:
    upload_id, first = await current_status(request)
    return await stream_status(request, f"upload.{upload_id}", first)


async def stream_status(request: web.Request, key: str, first: dict[str, Any]) -> web.StreamResponse:
    """SSE (or WebSocket on upgrade) of the status at `key`, starting with `first`."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(request, key, first)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                 "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    updates = _updates(request, key, first)
    # One pending read at a time, never cancelled by the keep-alive timer: cancelling an
    # `anext` would end the generator, and with it the stream.
    pending: asyncio.Task[dict[str, Any]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(updates))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
            if not done:
                await response.write(b": keep-alive\n\n")
                continue
            try:
                status = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            await response.write(f"event: status\ndata: {json.dumps(status)}\n\n".encode())
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await updates.aclose()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _websocket(request: web.Request, key: str, first: dict[str, Any]) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=KEEPALIVE)
    await ws.prepare(request)

    async def drain_client() -> None:  # answers pings, notices a close from the client
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    reader = asyncio.create_task(drain_client())
    try:
        async for status in _updates(request, key, first):
            if ws.closed:
                break
            await ws.send_json(status)
    finally:
        await stop_task(reader)
        await ws.close()
    return ws


def add_progress_routes(app: web.Application, base_path: str) -> None:
    app.router.add_get(base_path + "{upload_id}/status", handle_status)
    app.router.add_get(base_path + "{upload_id}/progress", handle_progress)
