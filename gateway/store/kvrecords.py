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
(404), NATS unreachable or leaderless is StoreUnavailable (503).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from events.bus import EventBus
from events.kv import open_bucket
from gateway.store.base import OffsetConflict, StoreUnavailable, UploadNotFound

__all__ = ["BUCKET", "KvRecords", "RecordChanged"]

BUCKET = "tusgate_uploads"
KEY_PREFIX = "upload."

T = TypeVar("T")


class RecordChanged(OffsetConflict):
    """The record was changed by someone else since it was read (or already exists)."""


class KvRecords:
    """Revision-checked JSON records, one per upload, in a NATS KV bucket."""

    def __init__(self, bus: EventBus, *, replicas: int = 1) -> None:
        self._bus = bus
        self._replicas = replicas
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            if not self._bus.connected:
                raise StoreUnavailable("NATS is not connected")
            self._kv = await open_bucket(self._bus.js, BUCKET, ttl=0, replicas=self._replicas)
        return self._kv

    async def _call(self, upload_id: str, op: Callable[[KeyValue], Awaitable[T]]) -> T:
        """Run one KV operation and translate its errors."""
        try:
            return await op(await self._bucket())
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RecordChanged(f"upload {upload_id} changed underneath") from exc
        except nats.js.errors.KeyNotFoundError as exc:  # also KeyDeletedError
            raise UploadNotFound(upload_id) from exc
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise StoreUnavailable(f"NATS KV failed: {type(exc).__name__}") from exc

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
        data = json.dumps(record).encode()
        return await self._call(upload_id, lambda kv: kv.create(KEY_PREFIX + upload_id, data))

    async def update(self, upload_id: str, record: dict[str, Any], revision: int) -> int:
        """Replace the record if it is still at `revision`; RecordChanged if not."""
        data = json.dumps(record).encode()
        return await self._call(
            upload_id, lambda kv: kv.update(KEY_PREFIX + upload_id, data, last=revision)
        )

    async def delete(self, upload_id: str, revision: int) -> None:
        """Delete the record if it is still at `revision`."""

        async def delete(kv: KeyValue) -> None:
            await kv.delete(KEY_PREFIX + upload_id, last=revision)

        await self._call(upload_id, delete)

    async def ids(self) -> list[str]:
        """Every upload id with a record (deleted ones may be included: `get` says 404).

        Read from the bucket's stream (its per-subject counts): nats-py's `keys()` relies on a
        watch whose end-of-snapshot marker is unreliable while others write."""
        await self._bucket()
        base = f"$KV.{BUCKET}.{KEY_PREFIX}"

        async def subjects(kv: KeyValue) -> dict[str, int]:
            info = await self._bus.js.stream_info(f"KV_{BUCKET}", subjects_filter=f"{base}>")
            return info.state.subjects or {}

        return sorted(s[len(base) :] for s in await self._call("*", subjects))
