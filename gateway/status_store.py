"""Where statuses live: a NATS KV bucket, written by a projector that folds the event stream.

    TUSGATE stream --(durable push consumer "status-projector", one queue group
                      shared by every gateway instance)--> apply_event --> KV tusgate_status
    KV key `upload.<id>` / `transfer.<id>`  <-- GET .../status reads it, .../progress watches it

Every instance can answer for every upload (no sticky sessions). Updates are revision-checked
(compare-and-set), and `apply_event` is monotonic, so two instances applying events of the
same upload, or a redelivered event, never make a status go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from events.bus import STREAM_NAME, EventBus
from events.errors import InvalidEvent
from events.kv import keys_under, open_bucket
from events.model import Event, parse_event
from events.tasks import stop_task
from gateway.status import apply_event, event_key, is_terminal

__all__ = ["BUCKET", "StatusStore"]

log = logging.getLogger("tusgate.status")

BUCKET = "tusgate_status"
PROJECTOR = "status-projector"
STATUS_TTL = 7 * 24 * 3600.0  # seconds a status is kept after its last change
CAS_ATTEMPTS = 20
MAX_BATCH = 256  # messages folded together at most
CACHE_SIZE = 10_000  # statuses whose last revision this instance remembers


class StatusStore:
    def __init__(
        self, bus: EventBus, *, replicas: int = 1, observe: Callable[[Event], None] | None = None
    ) -> None:
        self._bus = bus
        self._observe = observe
        self._replicas = replicas
        self._kv: KeyValue | None = None
        self._subscription: Any = None
        self._later: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._cache: OrderedDict[str, tuple[int | None, Any]] = OrderedDict()

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self._bus.js, BUCKET, ttl=STATUS_TTL, replicas=self._replicas)
        return self._kv

    async def start_projector(self) -> None:
        """Join the shared projector consumer (retried in the background until NATS is up)."""
        if self._bus.connected and await self._bus.wait_stream(2.0):
            await self._subscribe()
        else:
            self._later = asyncio.get_running_loop().create_task(self._subscribe_later())

    async def _subscribe_later(self) -> None:
        await self._bus.wait_stream(None)
        await self._subscribe()

    async def _subscribe(self) -> None:
        await self._bucket()
        config = ConsumerConfig(
            durable_name=PROJECTOR,
            deliver_group=PROJECTOR,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30,
            max_ack_pending=10_000,
        )
        for attempt in range(5):
            try:
                self._subscription = await self._bus.js.subscribe(
                    "tusgate.>", queue=PROJECTOR, durable=PROJECTOR, stream=STREAM_NAME,
                    manual_ack=True, config=config,
                )
                break
            except nats.js.errors.BadRequestError:
                # Two instances starting at once both tried to create the shared consumer; the
                # loser binds to the winner's on the next try.
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        self._runner = asyncio.get_running_loop().create_task(self._run(self._subscription))

    async def close(self) -> None:
        for task in (self._later, self._runner):
            if task is not None:
                await stop_task(task)
        sub, self._subscription = self._subscription, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _run(self, sub: Any) -> None:
        """Take what has arrived (up to MAX_BATCH messages), fold it per key, write each key
        once, then ack. Under load an upload's created/progress/bytes-received become one KV
        write instead of three; when idle a lone event is written at once.

        `close()` stops this with ONE cancel, which can get lost: on Python 3.11,
        `asyncio.wait_for` (inside nats-py's `next_msg` and requests) returns the result when
        the cancel arrives just as the awaited thing completes, and nats-py turns a cancel into
        `ConnectionClosedError` on a closed connection. The loop would then go back to
        `next_msg(timeout=None)` and, with NATS down, `close()` would wait forever. So the loop
        checks for a requested cancel before each step that may block."""
        task = asyncio.current_task()
        assert task is not None
        while True:
            if task.cancelling():
                raise asyncio.CancelledError
            try:
                batch = [await sub.next_msg(timeout=None)]
                while sub.pending_msgs and len(batch) < MAX_BATCH:
                    batch.append(await sub.next_msg(timeout=1.0))
                if task.cancelling():
                    raise asyncio.CancelledError  # unacked: the batch is redelivered
                await self._project(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                if task.cancelling():
                    raise asyncio.CancelledError from None
                log.exception("status projection failed; the batch will be redelivered")
                await asyncio.sleep(1)

    async def _project(self, batch: list[Msg]) -> None:
        by_key: dict[str, list[Any]] = {}
        acks: dict[str, list[Msg]] = {}
        for msg in batch:
            try:
                event = parse_event(msg.data)
            except InvalidEvent:
                await msg.term()  # not ours to understand; never redeliver it
                continue
            if self._observe is not None:
                self._observe(event)
            key = event_key(event)
            if key is None:
                await msg.ack()
                continue
            by_key.setdefault(key, []).append(event)
            acks.setdefault(key, []).append(msg)
        for key, events in by_key.items():
            try:
                await self.apply(key, *events)
                for msg in acks[key]:
                    await msg.ack()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("status update of %s failed (%s); will be redelivered", key, exc)
                for msg in acks[key]:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1)

    async def apply(self, key: str, *events: Any) -> dict[str, Any]:
        """Fold `events` into the status at `key` (compare-and-set, retried); the new status.

        The last value and revision written by this instance are remembered, so the usual case
        is one KV write and no read; a stale cache only costs a failed write and a read."""
        kv = await self._bucket()
        cached = self._cache.get(key)
        for _ in range(CAS_ATTEMPTS):
            if cached is None:
                try:
                    entry = await kv.get(key)
                    cached = (entry.revision, json.loads(entry.value or b"null"))
                except nats.js.errors.KeyNotFoundError:
                    cached = (None, None)
            revision, current = cached
            new: dict[str, Any] | None = current
            for event in events:
                new = apply_event(new, event)
            payload = json.dumps(new).encode()
            try:
                if revision is None:
                    revision = await kv.create(key, payload)
                else:
                    revision = await kv.update(key, payload, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                cached = None  # another instance updated it first: fold again on top of theirs
                continue
            assert new is not None
            self._remember(key, revision, new)
            return new
        raise nats.errors.Error(f"status {key}: too many concurrent updates")

    def _remember(self, key: str, revision: int, status: dict[str, Any]) -> None:
        self._cache[key] = (revision, status)
        self._cache.move_to_end(key)
        if is_terminal(status):
            self._cache.pop(key)  # nothing more will come for it
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def get(self, key: str) -> dict[str, Any] | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        value: dict[str, Any] = json.loads(entry.value or b"null")
        return value

    async def list(self, prefix: str) -> list[dict[str, Any]]:
        """Every status under `prefix` (e.g. "transfer."); for listing endpoints."""
        statuses = []
        for key in await keys_under(await self._bucket(), prefix):
            status = await self.get(key)
            if status is not None:
                statuses.append(status)
        return statuses

    async def watch(self, key: str) -> AsyncIterator[dict[str, Any]]:
        """The current status (if any), then each change, until a terminal state."""
        kv = await self._bucket()
        watcher = await kv.watch(key)
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue  # the marker "initial values done", or a delete
                status = json.loads(entry.value)
                yield status
                if is_terminal(status):
                    return
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
