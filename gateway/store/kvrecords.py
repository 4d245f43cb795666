"""Upload records in NATS KV: the state every gateway instance and worker shares.

    KV bucket `tusgate_uploads` (history 1, no TTL), key `upload.<id>`, value = one JSON record
    get       kv.get(key)                     -> (record, revision)
    create    kv.create(key)                  -- fails if the key exists
    update    kv.update(key, last=revision)   -- fails if anyone wrote since `revision` was read
    delete    kv.delete(key, last=revision)

Every update is revision-checked (compare-and-set): a writer that lost the race learns it
(`RecordChanged`) instead of overwriting what another instance just wrote. The S3 store keeps
its uploads' info and their durable offset here (see s3store.py), so a HEAD costs one KV read
and no instance needs a sticky session.

NATS errors become store errors the handlers already answer: a missing key is UploadNotFound
(404); NATS unreachable, or a bucket without a leader for longer than RETRY_WINDOW, is
StoreUnavailable (503).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from events.bus import EventBus
from events.kv import TRANSIENT_ERRORS, keys_under, open_bucket
from gateway.store.base import OffsetConflict, StoreUnavailable, UploadNotFound

__all__ = ["BUCKET", "KvRecords", "RecordChanged"]

BUCKET = "tusgate_uploads"
KEY_PREFIX = "upload."
RETRY_WINDOW = 5.0  # seconds a KV operation is retried while NATS cannot answer
RETRY_PAUSE = 0.1
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes
RECONNECT_WAIT = 1.0  # seconds an operation waits for a lost connection to come back

T = TypeVar("T")


class RecordChanged(OffsetConflict):
    """The record was changed by someone else since it was read (or already exists)."""


class KvRecords:
    """Revision-checked JSON records, one per upload, in a NATS KV bucket."""

    def __init__(
        self, bus: EventBus, *, replicas: int = 1, retry_window: float = RETRY_WINDOW
    ) -> None:
        self._bus = bus
        self._replicas = replicas
        self._retry_window = retry_window
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self._bus.js, BUCKET, ttl=0, replicas=self._replicas)
        return self._kv

    async def _call(self, upload_id: str, op: Callable[[KeyValue], Awaitable[T]]) -> T:
        """Run one KV operation and translate its errors. "NATS cannot answer right now" (a
        replicated bucket electing a leader: after its creation, or after losing a node) is
        retried for `retry_window` seconds before it becomes StoreUnavailable (503)."""
        # A reconnect to another node takes a moment; NATS down altogether is a quick 503.
        if not self._bus.connected and not await self._bus.wait_connected(RECONNECT_WAIT):
            raise StoreUnavailable("NATS is not connected")
        deadline = time.monotonic() + self._retry_window
        while True:
            try:
                return await op(await self._bucket())
            except nats.js.errors.KeyWrongLastSequenceError as exc:
                raise RecordChanged(f"upload {upload_id} changed underneath") from exc
            except nats.js.errors.KeyNotFoundError as exc:  # also KeyDeletedError
                raise UploadNotFound(upload_id) from exc
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"NATS KV failed: {type(exc).__name__}") from exc
                await asyncio.sleep(RETRY_PAUSE)
            except nats.js.errors.APIError as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE:  # kv.delete does not translate it
                    raise RecordChanged(f"upload {upload_id} changed underneath") from exc
                raise StoreUnavailable(f"NATS KV failed: {exc.description}") from exc
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                raise StoreUnavailable(f"NATS KV failed: {type(exc).__name__}") from exc

    async def _write(self, upload_id: str, data: bytes, revision: int) -> int:
        """kv.update(last=revision) (revision 0: create). When a retry is refused because the
        record changed, the change may be our own earlier attempt whose answer was lost: if
        the record holds exactly our bytes, that attempt landed."""
        key = KEY_PREFIX + upload_id
        attempts = 0

        async def write(kv: KeyValue) -> int:
            nonlocal attempts
            attempts += 1
            if revision == 0:
                return await kv.create(key, data)
            return await kv.update(key, data, last=revision)

        try:
            return await self._call(upload_id, write)
        except RecordChanged:
            if attempts < 2:
                raise
            entry = await self._call(upload_id, lambda kv: kv.get(key))
            if entry.value != data or entry.revision is None:
                raise
            return entry.revision

    async def get(self, upload_id: str) -> tuple[dict[str, Any], int]:
        """The record and its revision. Raises UploadNotFound."""
        entry = await self._call(upload_id, lambda kv: kv.get(KEY_PREFIX + upload_id))
        if entry.value is None or entry.revision is None:
            raise UploadNotFound(upload_id)
        try:
            record = json.loads(entry.value)
        except ValueError as exc:
            raise StoreUnavailable(f"record of {upload_id} is unreadable") from exc
        if not isinstance(record, dict):
            raise StoreUnavailable(f"record of {upload_id} is unreadable")
        return record, entry.revision

    async def create(self, upload_id: str, record: dict[str, Any]) -> int:
        """Store a new record; RecordChanged if one exists. Returns its revision."""
        return await self._write(upload_id, json.dumps(record).encode(), 0)

    async def update(self, upload_id: str, record: dict[str, Any], revision: int) -> int:
        """Replace the record if it is still at `revision`; RecordChanged if not."""
        if revision <= 0:
            raise ValueError("an update needs the revision it was read at")
        return await self._write(upload_id, json.dumps(record).encode(), revision)

    async def delete(self, upload_id: str, revision: int) -> None:
        """Delete the record if it is still at `revision` (a retried delete that finds it
        already gone is fine)."""

        async def delete(kv: KeyValue) -> None:
            await kv.delete(KEY_PREFIX + upload_id, last=revision)

        try:
            await self._call(upload_id, delete)
        except RecordChanged:
            try:
                await self.get(upload_id)
            except UploadNotFound:
                return  # deleted: by our own earlier attempt whose answer was lost
            raise

    async def ids(self) -> list[str]:
        """Every upload id with a record (deleted ones may be included: `get` says 404)."""
        keys = await self._call("*", lambda kv: keys_under(kv, KEY_PREFIX))
        return [key[len(KEY_PREFIX) :] for key in keys]
