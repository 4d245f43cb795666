"""The outbox: events are written to disk before the HTTP response, and published from there.

SPEC §5: "If NATS is down, the gateway keeps accepting bytes and delivers pending events when
NATS is back, losing none." So the gateway never publishes directly: it `record`s the event
(durable once `record` returns, before the response is sent) and a background relay publishes
pending events in order, noting on disk which ones JetStream acknowledged (the PubAck).

Append-only, because creating a file costs far more kernel time than appending to an open one
(about 0.5 ms against a few µs on a busy VM): events are appended to a *segment* that stays
open, and the relay appends *ack lines* to it instead of deleting a file per event.

On-disk layout of `FileOutbox(directory)`::

    <directory>/.lock                        flock of the one process using this directory
    <directory>/00001732198580123456789.log  a segment: event lines and ack lines, appended
    <directory>/00001732198612345678901.log  names sort by (hybrid) time: relay order
    <directory>/dead/*.json                  events NATS refused for good (too large, ...)

Each line of a segment is ``<crc> <kind> <seq>[ <envelope>]`` + LF, where ``<crc>`` is the
CRC-32 of everything after it, in 8 hex digits::

    1c291ca3 e 1 {"specversion":"1.0","id":"4f…:created",…}   event 1 (envelope shortened)
    80d2f7a5 e 2 {"specversion":"1.0","id":"4f…:bytes-received",…}
    eb070d27 a 2                                             events 1..2 are in the stream

Recording. Records that arrive while a write is in progress are appended together, as one
write (and one fsync with `fsync=True`, in a worker thread so the event loop keeps serving):
group commit. With `fsync=False` the write is a plain append to the page cache, which survives
a `kill -9` but not a power loss.

Acknowledging. The relay publishes strictly one event at a time, oldest first, so the events
of a segment are acknowledged in order and one number says which: an ack line "events 1..n are
done" (published, or moved to dead/). It is written when the relay catches up with a segment,
every `ACK_EVERY` events while it is busy, and before a pause for a NATS outage — not fsynced:
an ack line lost in a crash only re-publishes events acknowledged moments before, and
JetStream drops them as duplicates (their `Nats-Msg-Id` is in its duplicate window, 10 min).
What keeps an event older than that window from ever being sent again is its ack line; the
gap between a PubAck and its ack line is one relay round (milliseconds).

Rotation. A segment takes new events until it reaches `segment_bytes`; then a new one starts.
A segment all of whose events are done is deleted once it is full, or `segment_age` seconds
old, or at `close()` (no fsync: a delete lost in a power cut re-publishes acknowledged
events, dropped as duplicates). So steady traffic creates one file per `segment_bytes` of
events or per `segment_age` seconds, not one per event.

Crash recovery. Appends are sequential, so only the last line of a segment can be torn (a write
cut short by `kill -9` or a power cut, whose `record()` never returned). `start()` cuts off an
unterminated last line before anything is appended, so that later lines stay whole; a line
whose CRC does not match is skipped (not the lines after it), and since lines carry their
sequence number, a lost line does not shift what the ack lines mean. A zero-filled stretch
(data a power cut kept from the disk, `fsync=False`) is skipped up to the line after it. A
segment from a previous run takes no more events, only ack lines; its events after the last ack
line are relayed first. With `fsync=True` a new segment's directory entry is fsynced before its
first event counts. A directory written by the previous layout (one `<key>.jsonl` file per
batch) is read too: its files are relayed first and deleted once done.

Order. An event is queued for the relay when its record completes, and the relay keeps that
order; an upload's events are recorded one after the other, so they reach the stream in order.

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
import json
import logging
import os
import random
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from events.errors import OutboxClosed, OutboxLocked, OutboxWriteFailed, PublishError
from events.model import Event
from events.tasks import stop_task

__all__ = [
    "ACK_EVERY",
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_MAX_VOLATILE",
    "DEFAULT_SEGMENT_AGE",
    "DEFAULT_SEGMENT_BYTES",
    "FileOutbox",
    "Outbox",
    "Publisher",
]

log = logging.getLogger(__name__)

DEFAULT_BACKOFF_INITIAL = 0.05  # seconds before the first retry of a failed publish
DEFAULT_BACKOFF_MAX = 2.0  # seconds: the longest pause between retries while NATS is down
DEFAULT_MAX_VOLATILE = 10_000  # progress events kept in memory while NATS is down
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024  # a segment takes no more events past this size
DEFAULT_SEGMENT_AGE = 60.0  # seconds: a segment whose events are all done is deleted after this
ACK_EVERY = 100  # events: the longest run of acknowledged events without an ack line
_NAME_DIGITS = 23  # time_ns has 19 digits today; room for a few centuries more
_SUFFIX = ".log"
_LEGACY_SUFFIX = ".jsonl"  # the previous layout: one file of envelopes per batch
_EVENT = b"e"
_ACK = b"a"


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


@dataclass(eq=False)
class _Segment:
    """One segment file. `acked` moves in memory as PubAcks come in; `saved` is what its ack
    lines say. Events 1..acked are done; `last_seq` is the number of its last event."""

    key: int
    path: Path
    fd: int | None = None  # open while lines may be appended (O_APPEND)
    size: int = 0  # bytes of whole lines: where the next append starts
    last_seq: int = 0
    acked: int = 0
    saved: int = 0
    created: float = 0.0  # loop time, for `segment_age`
    sealed: bool = False  # takes no more events (ack lines only)
    legacy: bool = False  # a `.jsonl` file of the previous layout: read-only
    broken: bool = False  # a failed append could not be cut off again: append nothing more

    @property
    def done(self) -> bool:
        return self.acked >= self.last_seq


@dataclass(slots=True)
class _Item:
    """A pending event in relay order; `segment` is None for a volatile one (memory only)."""

    payload: bytes
    segment: _Segment | None = None
    seq: int = 0


class FileOutbox:
    """Events appended to segments in a local directory, relayed in order by one task."""

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
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_age: float = DEFAULT_SEGMENT_AGE,
    ) -> None:
        """`fsync=False` keeps events across a process crash but not a power loss."""
        if segment_bytes <= 0 or segment_age <= 0:
            raise ValueError("segment_bytes and segment_age must be positive")
        self.directory = Path(directory)
        self.dead_directory = self.directory / "dead"
        self._publisher = publisher
        self._fsync = fsync
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._publish_timeout = publish_timeout
        self._max_volatile = max_volatile
        self._segment_bytes = segment_bytes
        self._segment_age = segment_age
        self._segments: deque[_Segment] = deque()  # oldest first; the active one is last
        self._active: _Segment | None = None  # where new events are appended
        self._queue: deque[_Item] = deque()  # relay order
        self._pending = 0  # events waiting for their PubAck
        self._volatile = 0  # of which in memory only
        self._unsaved = 0  # events acknowledged since the last ack lines were written
        self._batch: list[tuple[bytes, asyncio.Future[None]]] = []
        self._save_due = False
        self._disk: asyncio.Task[None] | None = None  # the one task that writes to segments
        self._age_timer: asyncio.TimerHandle | None = None
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
        segments, items = await asyncio.to_thread(self._open_directory)
        self._segments.extend(segments)
        for item in items:
            self._push(item)
        if items:
            log.info("outbox: %d pending event(s) from a previous run", len(items))
        self._publisher.add_connect_listener(self.kick)
        self._relay = asyncio.create_task(self._run_relay(), name="tusgate-outbox-relay")

    async def close(self, *, flush_timeout: float | None = 0) -> None:
        """Stop the relay (after up to `flush_timeout` seconds of flushing). Durable events
        still pending stay on disk and are published by the next `start()`."""
        if flush_timeout != 0 and self._relay is not None:
            await self.flush(flush_timeout)
        self._closed = True
        relay, self._relay = self._relay, None
        if relay is not None:
            await stop_task(relay)
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None
        if self._disk is not None:
            await self._disk  # let the batch being written complete: its records are waiting
        if self._lock_fd is not None:
            try:
                self._retire(closing=True)
                self._save_acks()
            except OSError as exc:
                log.warning("outbox: cannot tidy %s at close: %s", self.directory, exc)
        for segment in self._segments:
            _close_fd(segment)
        self._segments.clear()
        self._active = None
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

    async def flush(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

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
            self._push(_Item(payload))
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((payload, done))
        self._schedule_disk()
        await done

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        self._pending += 1
        self._drained.clear()
        self._wake.set()

    # -- the disk task: the only writer of segments, so appends never interleave --

    def _schedule_disk(self) -> None:
        if self._disk is None or self._disk.done():
            self._disk = asyncio.create_task(self._run_disk(), name="tusgate-outbox-disk")

    async def _run_disk(self) -> None:
        # Everything recorded while the previous batch was being written goes in the next one.
        while self._batch or self._save_due:
            if self._batch:
                batch, self._batch = self._batch, []
                await self._commit(batch)
            self._save_due = False
            try:
                self._retire()
                self._save_acks()
            except OSError as exc:
                # Only the notes are missing: the events may be published again after a
                # crash, and JetStream drops them as duplicates.
                log.warning("outbox: cannot note acknowledged events: %s", exc)

    async def _commit(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        """Append `batch` to the active segment in one write; then its records return."""
        try:
            segment = self._active or await self._new_segment()
            first = segment.last_seq + 1
            lines = [_line(_EVENT, first + i, payload) for i, (payload, _) in enumerate(batch)]
            acked = segment.acked
            if acked > segment.saved:
                lines.append(_line(_ACK, acked))  # the ack line rides along for free
            data = b"".join(lines)
            if self._fsync:
                await asyncio.to_thread(self._append, segment, data, True)
            else:
                self._append(segment, data, False)  # a page-cache write: µs, less than a thread hop
        except Exception as exc:
            # Fail the records rather than leave them waiting forever (a bug is logged).
            if not isinstance(exc, OSError):
                log.exception("outbox: unexpected failure writing to %s", self.directory)
            if self._active is not None and self._active.broken:
                self._seal(self._active)
            error = OutboxWriteFailed(f"cannot write event to {self.directory}: {exc}",
                                      errno=getattr(exc, "errno", None))  # fmt: skip
            for _, done in batch:
                if not done.done():
                    done.set_exception(error)
            return
        segment.last_seq += len(batch)
        segment.saved = max(segment.saved, acked)
        for i, (payload, done) in enumerate(batch):
            self._push(_Item(payload, segment, first + i))
            if not done.done():
                done.set_result(None)

    async def _new_segment(self) -> _Segment:
        loop = asyncio.get_running_loop()
        key = self._next_key()
        path = self.directory / f"{key:0{_NAME_DIGITS}d}{_SUFFIX}"
        segment = _Segment(key, path, created=loop.time())
        if self._fsync:
            await asyncio.to_thread(self._create, segment)
        else:
            self._create(segment)
        self._segments.append(segment)
        self._active = segment
        self._age_timer = loop.call_later(self._segment_age, self._request_save)
        return segment

    def _create(self, segment: _Segment) -> None:
        fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            if self._fsync and self._dir_fd is not None:
                os.fsync(self._dir_fd)  # the new name must survive a power cut with its events
        except BaseException:
            os.close(fd)
            segment.path.unlink(missing_ok=True)
            raise
        segment.fd = fd

    def _append(self, segment: _Segment, data: bytes, sync: bool) -> None:
        """Append whole lines, or nothing: a failed write is cut off again, so that no part of
        a failed batch is ever relayed and no half line sits in front of the next one."""
        if segment.fd is None:
            raise OSError(f"{segment.path} is not open")
        try:
            self._write(segment.fd, data)
            if sync:
                os.fsync(segment.fd)
        except OSError:
            try:
                os.ftruncate(segment.fd, segment.size)
            except OSError:
                segment.broken = True
            raise
        segment.size += len(data)

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _save_acks(self) -> None:
        """Append an ack line to each segment whose acknowledged events moved on."""
        for segment in self._segments:
            if segment.acked <= segment.saved or segment.legacy or segment.broken:
                continue
            if segment.fd is None:
                segment.fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
            acked = segment.acked
            self._append(segment, _line(_ACK, acked), False)
            segment.saved = acked
        self._unsaved = 0

    def _retire(self, *, closing: bool = False) -> None:
        """Start a new segment past the size limit; delete the ones whose events are all done."""
        active = self._active
        if active is not None:
            old = asyncio.get_running_loop().time() - active.created >= self._segment_age
            full = active.size >= self._segment_bytes
            if active.broken or full or (active.done and (old or closing)):
                self._seal(active)
        for segment in [s for s in self._segments if s.sealed and s.done]:
            self._segments.remove(segment)
            _close_fd(segment)
            segment.path.unlink(missing_ok=True)

    def _seal(self, segment: _Segment) -> None:
        segment.sealed = True
        if segment is self._active:
            self._active = None
            if self._age_timer is not None:
                self._age_timer.cancel()
                self._age_timer = None
        if not segment.done and segment is not self._segments[0]:
            _close_fd(segment)  # a backlog after an outage: reopened when its turn comes

    def _request_save(self) -> None:
        self._save_due = True
        self._schedule_disk()

    def _next_key(self) -> int:
        # Hybrid clock: wall time when it moves forward, +1 when it does not.
        self._last_key = max(time.time_ns(), self._last_key + 1)
        return self._last_key

    # -- start-up --

    def _open_directory(self) -> tuple[list[_Segment], list[_Item]]:
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
            # A batch file of the previous layout whose record() never returned: no response
            # was sent for it, so nobody relies on it, and part of it may be missing.
            tmp.unlink(missing_ok=True)
        found: list[tuple[int, Path]] = []
        for suffix in (_SUFFIX, _LEGACY_SUFFIX):
            found.extend(
                (int(p.stem), p) for p in self.directory.glob(f"*{suffix}") if p.stem.isdigit()
            )
        segments: list[_Segment] = []
        items: list[_Item] = []
        for key, path in sorted(found):
            self._last_key = max(self._last_key, key)
            segment, pending = _load(path, key)
            if segment.done:
                path.unlink(missing_ok=True)  # every event in it is in the stream
                continue
            segments.append(segment)
            items.extend(pending)
        return segments, items

    # -- relaying --

    async def _run_relay(self) -> None:
        backoff = self._backoff_initial
        while True:
            if not self._queue:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            try:
                subject, msg_id = _routing(item.payload)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("outbox: unreadable event (%s); moved to dead/", exc)
                await asyncio.to_thread(self._bury, self._dead_name(item), item.payload)
                self._done(item)
                continue
            try:
                await self._publisher.publish_raw(
                    subject, item.payload, msg_id=msg_id, timeout=self._publish_timeout
                )
            except PublishError as exc:
                self.failed_attempts += 1
                if not exc.retryable:
                    log.error("outbox: NATS refused %s for good (%s); moved to dead/", msg_id, exc)
                    await asyncio.to_thread(self._bury, self._dead_name(item), item.payload)
                    self._done(item)
                    continue
                log.debug("outbox: publish of %s failed (%s); retry in %.2fs", msg_id, exc, backoff)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            except Exception:
                # A bug in the publisher must not kill the relay: events would pile up silently.
                self.failed_attempts += 1
                log.exception("outbox: unexpected publish failure for %s", msg_id)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = self._backoff_initial
            self.published += 1
            self._done(item)  # the PubAck is in: the event is in the stream

    def _done(self, item: _Item) -> None:
        """`item` is in the stream (or in dead/): off the queue, and noted for an ack line."""
        self._queue.popleft()
        self._pending -= 1
        segment = item.segment
        if segment is None:
            self._volatile -= 1
        else:
            segment.acked = item.seq
            self._unsaved += 1
        # One ack line per relay round: when the relay catches up (with everything, or with
        # a segment, which may then be deleted), and at least every ACK_EVERY events.
        caught_up = not self._queue or (segment is not None and segment.done)
        if self._unsaved and (caught_up or self._unsaved >= ACK_EVERY):
            self._request_save()

    async def _pause(self, delay: float) -> None:
        if self._unsaved:
            self._request_save()  # what went through before the outage is noted now
        # Jitter so that many gateways do not retry in lockstep; a kick (NATS reconnected, or a
        # new event) ends the pause early. A failed attempt while disconnected costs nothing:
        # BusUnavailable is raised before anything is sent.
        # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel of close()
        # when the wake-up comes in the same loop iteration.)
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * random.uniform(0.8, 1.2)):
                await self._wake.wait()

    def _dead_name(self, item: _Item) -> str:
        key = item.segment.key if item.segment is not None else self._next_key()
        return f"{key:0{_NAME_DIGITS}d}-{item.seq}.json"

    def _bury(self, name: str, payload: bytes) -> None:
        path = self.dead_directory / name
        try:
            self.dead_directory.mkdir(exist_ok=True)
            path.write_bytes(payload)
        except OSError as exc:
            log.error("outbox: could not keep the refused event in %s (%s)", path, exc)


def _line(kind: bytes, seq: int, body: bytes = b"") -> bytes:
    rest = b"%s %d %s" % (kind, seq, body) if body else b"%s %d" % (kind, seq)
    return b"%08x %s\n" % (zlib.crc32(rest), rest)


def _parse(line: bytes) -> tuple[bytes, int, bytes] | None:
    """(kind, seq, envelope) of an intact line; None for a damaged one."""
    # A power cut can leave zero bytes where a write never reached the disk, on the same line
    # as the next intact one. JSON escapes control characters, so no intact line holds a zero
    # byte: the part after the last one is what may be intact.
    line = line.rpartition(b"\0")[2]
    crc, _, rest = line.partition(b" ")
    if crc != b"%08x" % zlib.crc32(rest):
        return None
    kind, _, rest = rest.partition(b" ")
    seq, _, body = rest.partition(b" ")
    if kind not in (_EVENT, _ACK) or not seq.isdigit():
        return None
    return kind, int(seq), body


def _load(path: Path, key: int) -> tuple[_Segment, list[_Item]]:
    """A segment of a previous run, sealed, and its events not yet done, in order."""
    data = path.read_bytes()
    segment = _Segment(key, path, sealed=True, legacy=path.suffix == _LEGACY_SUFFIX)
    events: list[tuple[int, bytes]] = []
    if segment.legacy:
        for line in data.split(b"\n"):
            if line.strip():
                segment.last_seq += 1
                events.append((segment.last_seq, line))
        return segment, [_Item(body, segment, seq) for seq, body in events]
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        # The last write was cut short (its record() never returned). Cut off the half line
        # before anything is appended after it, or it would swallow the next line.
        log.warning("outbox: %s ends in a torn line (%d bytes); cut off", path, len(data) - whole)
        os.truncate(path, whole)
    segment.size = whole
    damaged = 0
    for line in data[:whole].split(b"\n")[:-1]:
        parsed = _parse(line)
        if parsed is None:
            damaged += 1
            continue
        kind, seq, body = parsed
        if kind == _EVENT:
            events.append((seq, body))
            segment.last_seq = max(segment.last_seq, seq)
        else:
            segment.acked = max(segment.acked, seq)
    if damaged:
        log.warning("outbox: %d damaged line(s) in %s skipped", damaged, path)
    segment.saved = segment.acked
    return segment, [_Item(body, segment, seq) for seq, body in events if seq > segment.acked]


def _close_fd(segment: _Segment) -> None:
    if segment.fd is not None:
        with contextlib.suppress(OSError):
            os.close(segment.fd)
        segment.fd = None


def _routing(payload: bytes) -> tuple[str, str]:
    """Subject and Nats-Msg-Id of a stored envelope: its `type` and `id`."""
    envelope = json.loads(payload)
    subject, msg_id = envelope["type"], envelope["id"]
    if not isinstance(subject, str) or not isinstance(msg_id, str):
        raise TypeError("envelope type and id must be strings")
    return subject, msg_id
