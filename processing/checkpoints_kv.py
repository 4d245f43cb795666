"""Processing state in NATS KV, so that any worker can continue any other worker's job.

One bucket, ``tusgate_processing`` (history 1, TTL `BUCKET_TTL`, replicas as the stream), with
three kinds of key (ids are hex or ``tr_...``; anything else is hashed into a valid key):

    ckpt.<key>      a destination's resumable state (the Graph upload session URL, bytes done):
                    :class:`KvCheckpointStore`, the CheckpointStore the destinations use
    job.<id>        the worker's ledger of one upload or transfer: lease, attempts, last error,
                    outcome (see :mod:`processing.ledger`)
    cleanup.<id>    when to discard the staged bytes of a delivered upload

The ``uploadUrl`` in a checkpoint grants write access without a token: NATS permissions should
keep this bucket readable by workers only.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

import events.kv

__all__ = ["BUCKET", "BUCKET_TTL", "KvCheckpointStore", "kv_key", "open_bucket"]

BUCKET = "tusgate_processing"
#: Seconds a key lives after its last write: as long as the TUSGATE stream keeps events, so a
#: redelivered event always finds its job's outcome.
BUCKET_TTL = 7 * 24 * 3600.0

_VALID = re.compile(r"[A-Za-z0-9_=-]{1,200}")


def kv_key(prefix: str, key: str) -> str:
    """``<prefix>.<key>``; a key with characters KV does not allow becomes its sha256."""
    if not _VALID.fullmatch(key):
        key = "h-" + hashlib.sha256(key.encode()).hexdigest()
    return f"{prefix}.{key}"


async def open_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The processing bucket, created on first use (safe when several workers race)."""
    return await events.kv.open_bucket(js, BUCKET, ttl=BUCKET_TTL, replicas=replicas)


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw or b"null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class KvCheckpointStore:
    """A CheckpointStore on the processing bucket (keys ``ckpt.<key>``).

    Raises ``nats.errors.Error`` / ``TimeoutError`` when NATS is unreachable; the pipeline turns
    those into a retryable failure (the attempt is retried, and resumes from what was saved).
    """

    PREFIX = "ckpt"

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def load(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self._kv.get(kv_key(self.PREFIX, key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode(entry.value)

    async def save(self, key: str, state: dict[str, Any]) -> None:
        await self._kv.put(kv_key(self.PREFIX, key), encode(state))

    async def delete(self, key: str) -> None:
        try:
            await self._kv.delete(kv_key(self.PREFIX, key))
        except nats.js.errors.KeyNotFoundError:
            pass
