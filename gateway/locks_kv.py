"""One writer per upload across every gateway instance: a lock in NATS KV, with takeover.

    KV bucket `tusgate_locks` (max age = LOCK_TTL), key `upload.<id>`, value = holder id
    acquire   kv.create(key)            -- fails if someone holds it
    keep      kv.update(key, last=rev)  -- every LOCK_TTL/3 while held; a crashed holder stops
                                           refreshing and its key ages out after LOCK_TTL
    release   kv.delete(key, last=rev)
    takeover  a newcomer publishes on `_tusgate.lock.release.<id>` (outside the TUSGATE stream);
              every instance listens once, and the holding one ends its request (the same
              `on_release_requested` callback as the in-process locker), then releases.

The newcomer polls `create` every POLL seconds while it waits (only ever while contended),
up to `timeout`, then gets LockBusy (423).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from events.bus import EventBus
from events.kv import TRANSIENT_ERRORS, open_bucket
from events.tasks import stop_task
from gateway import errors
from gateway.locks import LocalLocker, LockBusy

__all__ = ["KvLocker"]

log = logging.getLogger("tusgate.locks")

BUCKET = "tusgate_locks"
RELEASE_SUBJECT = "_tusgate.lock.release"
LOCK_TTL = 5.0  # seconds a lock outlives its last refresh (a crashed holder's lock expires)
POLL = 0.1  # seconds between attempts while waiting for a contended lock
NOT_OURS: tuple[type[Exception], ...] = (nats.js.errors.KeyNotFoundError, *TRANSIENT_ERRORS)


class KvLocker:
    """Locker protocol over NATS KV. In-process contention is settled by a LocalLocker first,
    so one instance never races itself over the KV key."""

    def __init__(self, bus: EventBus, *, timeout: float = 10.0, replicas: int = 1) -> None:
        self.timeout = timeout
        self._bus = bus
        self._replicas = replicas
        self._local = LocalLocker(timeout=timeout)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._kv: KeyValue | None = None
        self._callbacks: dict[str, Callable[[], None] | None] = {}
        self._subscription: Any = None
        self._listen_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for release requests, now or on the first connection to NATS."""
        if self._bus.connected:
            await self._listen()
        else:
            self._bus.add_connect_listener(self._on_connected)

    def _on_connected(self) -> None:
        if self._subscription is None and self._listen_task is None:
            self._listen_task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        if self._subscription is None:
            self._subscription = await self._bus.nc.subscribe(f"{RELEASE_SUBJECT}.*", cb=self._on_release)
        # Created now rather than by the first PATCH: a replicated bucket needs a moment to
        # elect its leader. If this fails, the first PATCH tries again.
        with contextlib.suppress(*TRANSIENT_ERRORS, nats.js.errors.Error):
            await self._bucket()

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    def is_held(self, upload_id: str) -> bool:
        return self._local.is_held(upload_id)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self._bus.js, BUCKET, ttl=LOCK_TTL, replicas=self._replicas)
        return self._kv

    async def _on_release(self, msg: Any) -> None:
        if msg.data == self._me.encode():
            return  # our own request, echoed back by NATS: it must not end our waiting request
        upload_id = msg.subject.rsplit(".", 1)[-1]
        callback = self._callbacks.get(upload_id)
        if callback is not None:
            callback()

    async def _acquire(self, kv: KeyValue, key: str, upload_id: str) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        asked = False
        while True:
            try:
                return await kv.create(key, self._me.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except TRANSIENT_ERRORS as exc:  # NATS cannot answer now: not "the lock is taken"
                # The bucket has no leader for a moment (a node died, or it was just created
                # with replicas): retry until the lock timeout, then 503 -- never a 500.
                if (revision := await self._own_revision(kv, key)) is not None:
                    return revision  # our create landed; only its answer was lost
                if loop.time() >= deadline:
                    raise errors.LOCK_UNAVAILABLE.error(type(exc).__name__) from None
                await asyncio.sleep(POLL)
                continue
            if not asked:
                # Ask whoever holds it to stop; a crashed holder cannot answer, its key ages out.
                await self._bus.nc.publish(f"{RELEASE_SUBJECT}.{upload_id}", self._me.encode())
                asked = True
            if loop.time() >= deadline:
                raise LockBusy(upload_id)
            await asyncio.sleep(POLL)

    async def _own_revision(self, kv: KeyValue, key: str) -> int | None:
        try:
            entry = await kv.get(key)
        except NOT_OURS:
            return None
        return entry.revision if entry.value == self._me.encode() else None

    async def _keep(self, kv: KeyValue, key: str, lease: list[int], lost: Callable[[], None] | None) -> None:
        """Refresh the lock; if it was lost meanwhile (NATS unreachable past the TTL and someone
        else took it), end our request at once: two writers must never overlap."""
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            try:
                lease[0] = await kv.update(key, self._me.encode(), last=lease[0])
            except nats.js.errors.KeyWrongLastSequenceError:
                log.error("lock %s was lost; ending the request that held it", key)
                if lost is not None:
                    lost()
                return
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("could not refresh the lock %s: %s", key, exc)

    @asynccontextmanager
    async def hold(
        self, upload_id: str, on_release_requested: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        async with self._local.hold(upload_id, on_release_requested):
            kv = await self._bucket()
            key = f"upload.{upload_id}"
            self._callbacks[upload_id] = on_release_requested
            try:
                revision = await self._acquire(kv, key, upload_id)
            except BaseException:
                self._callbacks.pop(upload_id, None)
                raise
            lease = [revision]
            keeper = asyncio.create_task(self._keep(kv, key, lease, on_release_requested))
            try:
                yield
            finally:
                await stop_task(keeper)
                self._callbacks.pop(upload_id, None)
                with contextlib.suppress(Exception):  # only our own lease: never another's
                    await kv.delete(key, last=lease[0])
