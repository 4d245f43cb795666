"""The outbox: events are written to disk before the HTTP response, and published from there.

SPEC §5: "If NATS is down, the gateway keeps accepting bytes and delivers pending events when
NATS is back, losing none." So the gateway never publishes directly: it `record`s the event
(durable once `record` returns, before the response is sent) and a background relay publishes
pending events in order, deleting each one only after JetStream acknowledged it.

A crash between the PubAck and the delete re-publishes the event on restart with the same
`Nats-Msg-Id`, and JetStream drops it as a duplicate (within its duplicate window), so each
event is stored exactly once.

On-disk layout of `FileOutbox(directory)`::

    <directory>/.lock                        flock held by the one process relaying from here
    <directory>/00001732198580123456789.json an event envelope, exactly the bytes to publish
    <directory>/00001732198580123456790.json names sort by (hybrid) time: relay order
    <directory>/*.tmp                         a write in progress; removed at start (never acked)
    <directory>/dead/*.json                  events NATS refused for good (too large, ...)

Names are ``max(now_ns, previous + 1)`` zero-padded to 23 digits, so they sort in recording
order even when the clock steps back, across restarts too (the counter resumes after the
largest pending name). Per-upload order holds because the gateway records an upload's events
one after the other and the relay publishes strictly one at a time, oldest first.

Durability: the file is written to ``<name>.tmp``, fsynced, renamed, and the directory fsynced
(so the rename survives a power loss). The fsyncs run in a worker thread so the event loop keeps
serving other uploads meanwhile.

Requirements: a local, persistent, writable directory, one per process (the lock enforces it).
In a scaled deployment where instances lose their disk, use an outbox on shared storage instead
(the `Outbox` protocol is the seam for a NATS-KV or S3-backed one).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from events.errors import OutboxClosed, OutboxLocked, PublishError
from events.model import Event

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "FileOutbox",
    "Outbox",
    "Publisher",
]

log = logging.getLogger(__name__)

DEFAULT_BACKOFF_INITIAL = 0.05  # seconds before the first retry of a failed publish
DEFAULT_BACKOFF_MAX = 2.0  # seconds: the longest pause between retries while NATS is down
_NAME_DIGITS = 23  # time_ns has 19 digits today; room for a few centuries more


@runtime_checkable
class Outbox(Protocol):
    """Where the gateway hands events over. Implementations: `FileOutbox` (local directory);
    a NATS-KV or S3-backed one can replace it for instances without a persistent disk."""

    async def start(self) -> None:
        """Load pending events (from a previous run) and start relaying."""

    async def record(self, event: Event) -> None:
        """Durably keep `event`; when this returns, the event will be published eventually
        even if the process crashes right after."""

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every recorded event is acknowledged by JetStream; False on timeout."""

    @property
    def pending(self) -> int:
        """Events recorded but not yet acknowledged (for /metrics and /readyz)."""

    async def close(self, *, flush_timeout: float | None = 0) -> None:
        """Stop relaying, after waiting up to `flush_timeout` for pending events."""


class Publisher(Protocol):
    """What the relay needs from the bus (`EventBus` is one)."""

    async def publish_raw(
        self, subject: str, payload: bytes, *, msg_id: str, timeout: float | None = None
    ) -> Any: ...

    def add_connect_listener(self, callback: Callable[[], None]) -> None: ...


class FileOutbox:
    """One file per event in a local directory, relayed in order by one background task."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        publisher: Publisher,
        *,
        fsync: bool = True,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        publish_timeout: float | None = None,
    ) -> None:
        """`fsync=False` keeps events across a process crash but not a power loss (tests,
        benchmarks of the disk-less path)."""
        self.directory = Path(directory)
        self.dead_directory = self.directory / "dead"
        self._publisher = publisher
        self._fsync = fsync
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._publish_timeout = publish_timeout
        self._heap: list[str] = []  # pending file names; the smallest is published next
        self._cache: dict[str, bytes] = {}  # payloads recorded by this process (no re-read)
        self._last_key = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._relay: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self._closed = False
        self.published = 0  # counters for /metrics
        self.failed_attempts = 0

    # -- life cycle --

    async def start(self) -> None:
        if self._relay is not None:
            return
        await asyncio.to_thread(self._open_directory)
        self._publisher.add_connect_listener(self.kick)
        self._relay = asyncio.create_task(self._run_relay(), name="tusgate-outbox-relay")

    async def close(self, *, flush_timeout: float | None = 0) -> None:
        """Stop the relay (after up to `flush_timeout` seconds of flushing). Events still
        pending stay on disk and are published by the next `start()`."""
        if flush_timeout != 0 and self._relay is not None:
            await self.flush(flush_timeout)
        self._closed = True
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing the lock fd releases the flock
        self._dir_fd = self._lock_fd = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        return len(self._heap)

    def kick(self) -> None:
        """Wake the relay now (new event, or NATS is back) instead of after its backoff."""
        self._wake.set()

    # -- recording --

    async def record(self, event: Event) -> None:
        if self._closed or self._relay is None:
            raise OutboxClosed("the outbox is not running")
        payload = event.to_json_bytes()
        name = self._next_name()
        await asyncio.to_thread(self._write_durably, name, payload)
        self._cache[name] = payload
        heapq.heappush(self._heap, name)
        self._drained.clear()
        self._wake.set()

    async def flush(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _next_name(self) -> str:
        # Hybrid clock: wall time when it moves forward, +1 when it does not.
        self._last_key = max(time.time_ns(), self._last_key + 1)
        return f"{self._last_key:0{_NAME_DIGITS}d}.json"

    def _write_durably(self, name: str, payload: bytes) -> None:
        final = self.directory / name
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, payload)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if self._fsync and self._dir_fd is not None:
            os.fsync(self._dir_fd)  # make the rename itself durable

    def _open_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            raise OutboxLocked(f"{self.directory} is used by another process") from exc
        self._lock_fd = lock_fd
        self._dir_fd = os.open(self.directory, os.O_RDONLY)
        for tmp in self.directory.glob("*.tmp"):
            # A record() that never returned: no response was sent for it, so nobody relies on
            # it, and half of it may be missing.
            tmp.unlink(missing_ok=True)
        names = sorted(p.name for p in self.directory.glob("*.json"))
        self._heap = list(names)  # sorted is a valid heap
        if names:
            self._last_key = int(names[-1].removesuffix(".json"))
            self._drained.clear()
            log.info("outbox: %d pending event(s) from a previous run", len(names))

    # -- relaying --

    async def _run_relay(self) -> None:
        backoff = self._backoff_initial
        while True:
            if not self._heap:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            name = self._heap[0]
            try:
                cached = self._cache.get(name)
                payload = (
                    cached if cached is not None else await asyncio.to_thread(self._read, name)
                )
                subject, msg_id = _routing(payload)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("outbox: unreadable event %s (%s); moving it to dead/", name, exc)
                await asyncio.to_thread(self._bury, name)
                self._pop(name)
                continue
            try:
                await self._publisher.publish_raw(
                    subject, payload, msg_id=msg_id, timeout=self._publish_timeout
                )
            except PublishError as exc:
                self.failed_attempts += 1
                if not exc.retryable:
                    log.error("outbox: NATS refused %s for good (%s); moved to dead/", msg_id, exc)
                    await asyncio.to_thread(self._bury, name)
                    self._pop(name)
                    continue
                log.debug("outbox: publish of %s failed (%s); retry in %.2fs", msg_id, exc, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            except Exception:
                # A bug in the publisher must not kill the relay: events would pile up silently.
                self.failed_attempts += 1
                log.exception("outbox: unexpected publish failure for %s", msg_id)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = self._backoff_initial
            self.published += 1
            # The PubAck is in: the event is in the stream, the file may go.
            await asyncio.to_thread(self._unlink, name)
            self._pop(name)

    async def _sleep(self, delay: float) -> None:
        # Jitter so that many gateways do not retry in lockstep; a kick (NATS reconnected)
        # ends the pause early. Records kick too, but a failed attempt while disconnected
        # costs nothing (BusUnavailable is raised before anything is sent).
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay * random.uniform(0.8, 1.2))

    def _pop(self, name: str) -> None:
        if self._heap[0] == name:
            heapq.heappop(self._heap)
        else:
            # A record() that started earlier finished its write later and now sorts first
            # (two different uploads, so their relative order does not matter). Rare: O(n).
            self._heap.remove(name)
            heapq.heapify(self._heap)
        self._cache.pop(name, None)

    def _read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def _unlink(self, name: str) -> None:
        # No fsync: if the delete is lost in a power cut, the event is re-published and the
        # stream drops the duplicate.
        (self.directory / name).unlink(missing_ok=True)

    def _bury(self, name: str) -> None:
        self.dead_directory.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.directory / name, self.dead_directory / name)


def _routing(payload: bytes) -> tuple[str, str]:
    """Subject and Nats-Msg-Id of a stored envelope: its `type` and `id`."""
    envelope = json.loads(payload)
    subject, msg_id = envelope["type"], envelope["id"]
    if not isinstance(subject, str) or not isinstance(msg_id, str):
        raise TypeError("envelope type and id must be strings")
    return subject, msg_id
