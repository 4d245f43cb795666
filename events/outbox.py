"""The outbox: events are written to disk before the HTTP response, and published from there.

SPEC §5: "If NATS is down, the gateway keeps accepting bytes and delivers pending events when
NATS is back, losing none." So the gateway never publishes directly: it `record`s the event
(durable once `record` returns, before the response is sent) and a background relay publishes
pending events in order, deleting them only after JetStream acknowledged them (the PubAck).

A crash between the PubAck and the delete re-publishes the event on restart with the same
`Nats-Msg-Id`, and JetStream drops it as a duplicate (within its duplicate window), so each
event is stored exactly once.

On-disk layout of `FileOutbox(directory)`::

    <directory>/.lock                          flock of the one process using this directory
    <directory>/00001732198580123456789.jsonl  one or more envelopes, one per line, in order
    <directory>/00001732198580123456790.jsonl  names sort by (hybrid) time: relay order
    <directory>/*.tmp                          a write in progress; removed at start
    <directory>/dead/*.json                    events NATS refused for good (too large, ...)

Group commit: records that arrive while a write is in progress are written together in one
file with one fsync (usually a file holds a single event). The file is written to ``.tmp``,
fsynced, renamed, and the directory fsynced so the rename survives a power loss; this runs in
a worker thread, one batch at a time, so the event loop keeps serving meanwhile.

Names are ``max(now_ns, previous + 1)`` zero-padded to 23 digits, so they sort in recording
order even when the clock steps back, across restarts too (the counter resumes after the
largest pending name). Per-upload order holds because the gateway records an upload's events
one after the other and the relay publishes strictly one at a time, oldest first.

Events whose class says `DURABLE = False` (progress) skip the disk: they wait in memory in the
same ordered queue, are lost in a crash (the next progress event supersedes them anyway), and
at most `max_volatile` of them wait while NATS is down (newer ones are dropped beyond that).

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
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from events.errors import OutboxClosed, OutboxLocked, OutboxWriteFailed, PublishError
from events.model import Event

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_MAX_VOLATILE",
    "FileOutbox",
    "Outbox",
    "Publisher",
]

log = logging.getLogger(__name__)

DEFAULT_BACKOFF_INITIAL = 0.05  # seconds before the first retry of a failed publish
DEFAULT_BACKOFF_MAX = 2.0  # seconds: the longest pause between retries while NATS is down
DEFAULT_MAX_VOLATILE = 10_000  # progress events kept in memory while NATS is down
_NAME_DIGITS = 23  # time_ns has 19 digits today; room for a few centuries more
_SUFFIX = ".jsonl"


@runtime_checkable
class Outbox(Protocol):
    """Where the gateway hands events over. Implementations: `FileOutbox` (local directory);
    a NATS-KV or S3-backed one can replace it for instances without a persistent disk."""

    async def start(self) -> None:
        """Load pending events (from a previous run) and start relaying."""

    async def record(self, event: Event) -> None:
        """Keep `event`; once this returns, a durable event will be published eventually even
        if the process crashes right after. Raises `OutboxWriteFailed` if it cannot."""

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


@dataclass(order=True)
class _Entry:
    """Pending events in relay order: one batch file, or one in-memory (volatile) event."""

    key: int
    payloads: list[bytes] = field(compare=False)
    name: str | None = field(compare=False, default=None)  # None: in memory only
    done: int = field(compare=False, default=0)  # payloads already acknowledged


class FileOutbox:
    """Events in a local directory, relayed in order by one background task."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        publisher: Publisher,
        *,
        fsync: bool = True,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        publish_timeout: float | None = None,
        max_volatile: int = DEFAULT_MAX_VOLATILE,
    ) -> None:
        """`fsync=False` keeps events across a process crash but not a power loss."""
        self.directory = Path(directory)
        self.dead_directory = self.directory / "dead"
        self._publisher = publisher
        self._fsync = fsync
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._publish_timeout = publish_timeout
        self._max_volatile = max_volatile
        self._heap: list[_Entry] = []
        self._pending = 0  # events (not entries) waiting for their PubAck
        self._volatile = 0  # of which in memory only
        self._batch: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._last_key = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._relay: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self._closed = False
        # Counters for /metrics.
        self.published = 0
        self.failed_attempts = 0
        self.dropped_volatile = 0

    # -- life cycle --

    async def start(self) -> None:
        if self._relay is not None:
            return
        await asyncio.to_thread(self._open_directory)
        self._publisher.add_connect_listener(self.kick)
        self._relay = asyncio.create_task(self._run_relay(), name="tusgate-outbox-relay")

    async def close(self, *, flush_timeout: float | None = 0) -> None:
        """Stop the relay (after up to `flush_timeout` seconds of flushing). Durable events
        still pending stay on disk and are published by the next `start()`."""
        if flush_timeout != 0 and self._relay is not None:
            await self.flush(flush_timeout)
        self._closed = True
        writer, relay = self._writer, self._relay
        self._writer = self._relay = None
        if writer is not None:
            await writer  # let the batch being written complete: its records are waiting
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
        return self._pending

    def kick(self) -> None:
        """Wake the relay now (new event, or NATS is back) instead of after its backoff."""
        self._wake.set()

    # -- recording --

    async def record(self, event: Event) -> None:
        if self._closed or self._relay is None:
            raise OutboxClosed("the outbox is not running")
        payload = event.to_json_bytes()
        if not event.DURABLE:
            if self._volatile >= self._max_volatile:
                self.dropped_volatile += 1  # NATS has been down for a while: shed progress
                return
            self._volatile += 1
            self._push(_Entry(self._next_key(), [payload]))
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((payload, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches(), name="tusgate-outbox-write")
        await done

    async def _write_batches(self) -> None:
        # Everything recorded while the previous batch was being fsynced goes in the next one.
        while self._batch:
            batch, self._batch = self._batch, []
            key = self._next_key()
            name = f"{key:0{_NAME_DIGITS}d}{_SUFFIX}"
            payloads = [payload for payload, _ in batch]
            try:
                await asyncio.to_thread(self._write_durably, name, b"\n".join(payloads) + b"\n")
            except OSError as exc:
                error = OutboxWriteFailed(f"cannot write event to {self.directory}: {exc}",
                                          errno=exc.errno)  # fmt: skip
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            self._push(_Entry(key, payloads, name))
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(self._heap, entry)
        self._pending += len(entry.payloads)
        self._drained.clear()
        self._wake.set()

    async def flush(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _next_key(self) -> int:
        # Hybrid clock: wall time when it moves forward, +1 when it does not.
        self._last_key = max(time.time_ns(), self._last_key + 1)
        return self._last_key

    def _write_durably(self, name: str, data: bytes) -> None:
        final = self.directory / name
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
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
            # A write whose record() never returned: no response was sent for it, so nobody
            # relies on it, and part of it may be missing.
            tmp.unlink(missing_ok=True)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            payloads = [line for line in path.read_bytes().split(b"\n") if line.strip()]
            key = int(path.name.removesuffix(_SUFFIX))
            self._push(_Entry(key, payloads, path.name))
            self._last_key = max(self._last_key, key)
        if self._heap:
            log.info("outbox: %d pending event(s) from a previous run", self._pending)

    # -- relaying --

    async def _run_relay(self) -> None:
        backoff = self._backoff_initial
        while True:
            if not self._heap:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            entry = self._heap[0]
            payload = entry.payloads[entry.done]
            try:
                subject, msg_id = _routing(payload)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("outbox: unreadable event in %s (%s); moved to dead/", entry.name, exc)
                await asyncio.to_thread(self._bury, entry, payload)
                await self._advance(entry)
                continue
            try:
                await self._publisher.publish_raw(
                    subject, payload, msg_id=msg_id, timeout=self._publish_timeout
                )
            except PublishError as exc:
                self.failed_attempts += 1
                if not exc.retryable:
                    log.error("outbox: NATS refused %s for good (%s); moved to dead/", msg_id, exc)
                    await asyncio.to_thread(self._bury, entry, payload)
                    await self._advance(entry)
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
            await self._advance(entry)  # the PubAck is in: the event is in the stream

    async def _advance(self, entry: _Entry) -> None:
        entry.done += 1
        self._pending -= 1
        if entry.name is None:
            self._volatile -= 1
        if entry.done < len(entry.payloads):
            return
        if entry.name is not None:
            # No fsync: if the delete is lost in a power cut, the events are re-published and
            # the stream drops the duplicates.
            await asyncio.to_thread((self.directory / entry.name).unlink, missing_ok=True)
        self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        if self._heap[0] is entry:
            heapq.heappop(self._heap)
        else:
            # A batch that began earlier finished its write later and now sorts first (other
            # uploads, so their relative order does not matter). Rare: O(n).
            self._heap.remove(entry)
            heapq.heapify(self._heap)

    async def _sleep(self, delay: float) -> None:
        # Jitter so that many gateways do not retry in lockstep; a kick (NATS reconnected, or a
        # new event) ends the pause early. A failed attempt while disconnected costs nothing:
        # BusUnavailable is raised before anything is sent.
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay * random.uniform(0.8, 1.2))

    def _bury(self, entry: _Entry, payload: bytes) -> None:
        path = self.dead_directory / f"{entry.key:0{_NAME_DIGITS}d}-{entry.done}.json"
        try:
            self.dead_directory.mkdir(exist_ok=True)
            path.write_bytes(payload)
        except OSError as exc:
            log.error("outbox: could not keep the refused event in %s (%s)", path, exc)


def _routing(payload: bytes) -> tuple[str, str]:
    """Subject and Nats-Msg-Id of a stored envelope: its `type` and `id`."""
    envelope = json.loads(payload)
    subject, msg_id = envelope["type"], envelope["id"]
    if not isinstance(subject, str) or not isinstance(msg_id, str):
        raise TypeError("envelope type and id must be strings")
    return subject, msg_id
