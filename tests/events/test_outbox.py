"""The outbox: durable before the response, relayed in order, nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from events.bus import EventBus
from events.errors import (
    BusUnavailable,
    OutboxClosed,
    OutboxLocked,
    OutboxWriteFailed,
    PublishError,
)
from events.model import Event, UploadCreated, UploadProgress
from events.natsd import EmbeddedNats
from events.outbox import ACK_EVERY, FileOutbox, Outbox
from tests.events.samples import new_id, one_of_each
from tests.events.streamtools import msg_id_counts, stream_messages


class FakePublisher:
    """A Publisher that records what it is given, failing when `fail(msg_id)` says so."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.fail: Callable[[str], PublishError | None] = lambda msg_id: None
        self.listeners: list[Callable[[], None]] = []

    async def publish_raw(
        self, subject: str, payload: bytes, *, msg_id: str, timeout: float | None = None
    ) -> Any:
        error = self.fail(msg_id)
        if error is not None:
            raise error
        assert json.loads(payload)["type"] == subject
        self.published.append(msg_id)

    def add_connect_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)


def upload_story(upload_id: str, progress: int = 3) -> list[Event]:
    """The events of one upload, in the order the gateway records them."""
    created, _, received, *_ = one_of_each(upload_id=upload_id)
    steps = [UploadProgress(upload_id=upload_id, offset=i, size=1024) for i in range(progress)]
    return [created, *steps, received]


def pending_files(directory: Path) -> list[str]:
    """The segment files, in relay order."""
    return sorted(p.name for p in directory.glob("*.log"))


def segment_line(kind: str, seq: int, envelope: bytes = b"") -> bytes:
    """A line as the outbox docstring describes it: ``<crc> <kind> <seq>[ <envelope>]``."""
    rest = f"{kind} {seq}".encode() + (b" " + envelope if envelope else b"")
    return b"%08x %s\n" % (zlib.crc32(rest), rest)


def write_segment(directory: Path, lines: list[bytes], key: int | None = None) -> Path:
    path = directory / f"{key or time.time_ns():023d}.log"
    path.write_bytes(b"".join(lines))
    return path


def events_lines(events: list[Event]) -> list[bytes]:
    return [segment_line("e", i, e.to_json_bytes()) for i, e in enumerate(events, 1)]


def pending_events(directory: Path) -> list[str]:
    """Msg ids of the events not acknowledged yet, in relay order, read from the segments
    the way the module docstring describes them (a test of the format as much as a helper)."""
    out = []
    for name in pending_files(directory):
        events, acked = [], 0
        for line in (directory / name).read_bytes().split(b"\n")[:-1]:
            crc, kind, seq, *body = line.split(b" ", 3)
            assert int(crc, 16) == zlib.crc32(line[9:]), line
            if kind == b"a":
                acked = max(acked, int(seq))
            else:
                events.append((int(seq), json.loads(body[0])["id"]))
        out += [msg_id for seq, msg_id in events if seq > acked]
    return out


async def test_file_outbox_is_an_outbox(tmp_path: Path) -> None:
    assert isinstance(FileOutbox(tmp_path, FakePublisher()), Outbox)


async def test_recorded_event_is_published_within_milliseconds(
    tmp_path: Path, bus: EventBus, nc: NATS
) -> None:
    async with FileOutbox(tmp_path / "outbox", bus) as outbox:
        event = one_of_each()[2]
        started = time.perf_counter()
        await outbox.record(event)
        assert await outbox.flush(2)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.2, elapsed
        assert outbox.pending == 0
    assert await msg_id_counts(nc) == {event.msg_id: 1}
    assert pending_files(tmp_path / "outbox") == []


async def test_nats_outage_loses_nothing_and_stores_each_event_once(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    bus = EventBus(nats_server.url, reconnect_wait=0.1, publish_timeout=1.0)
    await bus.start(wait=5)
    uploads = [new_id() for _ in range(5)]
    stories = {uid: upload_story(uid) for uid in uploads}
    recorded: list[Event] = []
    async with FileOutbox(tmp_path / "outbox", bus, backoff_max=0.2) as outbox:

        async def record_upload(uid: str, pause: float) -> None:
            # One writer per upload: an upload's events are recorded one after the other.
            for event in stories[uid]:
                await outbox.record(event)
                recorded.append(event)
                await asyncio.sleep(pause)

        first = asyncio.gather(*(record_upload(uid, 0.002) for uid in uploads[:2]))
        await first
        await nats_server.astop()  # NATS goes away while uploads keep completing
        during = time.perf_counter()
        await asyncio.gather(*(record_upload(uid, 0.01) for uid in uploads[2:]))
        assert time.perf_counter() - during < 5  # records do not wait for NATS
        assert outbox.pending > 0
        await asyncio.sleep(0.3)  # let the relay fail and back off a few times
        await nats_server.astart()  # same port, same store
        assert await outbox.flush(10)
        assert outbox.failed_attempts > 0
    await bus.close()
    fresh = await nats.connect(nats_server.url)  # the fixture's `nc` lived through the outage
    try:
        counts = await msg_id_counts(fresh)
        messages = await stream_messages(fresh)
    finally:
        await fresh.close()
    assert counts == {e.msg_id: 1 for e in recorded}  # every event, exactly once
    for uid, story in stories.items():  # per-upload order preserved
        in_stream = [env["id"] for _, env in messages if env["subject"] == uid]
        assert in_stream == [e.msg_id for e in story]
    assert pending_files(tmp_path / "outbox") == []


async def test_events_of_a_previous_run_are_delivered(
    tmp_path: Path, bus: EventBus, nc: NATS
) -> None:
    # NATS is down: what EventBus.publish_raw raises then. (Not an EventBus on a dead port:
    # its close() can hang while nats-py retries the connection.)
    down = FakePublisher()
    down.fail = lambda msg_id: BusUnavailable()
    story = upload_story(new_id())
    async with FileOutbox(tmp_path, down) as outbox:
        for event in story:
            await outbox.record(event)
        assert not await outbox.flush(0.2)
    durable = [e.msg_id for e in story if e.DURABLE]
    assert pending_events(tmp_path) == durable  # "crash": the files stay, progress is gone

    async with FileOutbox(tmp_path, bus) as outbox:
        assert outbox.pending == len(durable)
        assert await outbox.flush(5)
    messages = await stream_messages(nc)
    assert [env["id"] for _, env in messages] == durable


async def test_crash_between_puback_and_ack_line_is_a_dropped_duplicate(
    tmp_path: Path, bus: EventBus, nc: NATS
) -> None:
    event = one_of_each()[2]
    await bus.publish(event)  # it reached the stream...
    write_segment(tmp_path, events_lines([event]))  # ...but no ack line says so
    async with FileOutbox(tmp_path, bus) as outbox:
        assert outbox.pending == 1
        assert await outbox.flush(5)
    assert await msg_id_counts(nc) == {event.msg_id: 1}
    assert pending_files(tmp_path) == []


async def test_files_of_the_previous_layout_are_relayed_then_deleted(tmp_path: Path) -> None:
    created, _, received, *_ = one_of_each(upload_id="u1")
    key = time.time_ns()
    (tmp_path / f"{key:023d}.jsonl").write_bytes(created.to_json_bytes() + b"\n")
    (tmp_path / f"{key + 1:023d}.jsonl").write_bytes(received.to_json_bytes())
    (tmp_path / f"{key + 2:023d}.tmp").write_bytes(b'{"specversion":')  # a write never finished
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        assert outbox.pending == 2
        await outbox.record(one_of_each(upload_id="u1")[3])  # terminated, after them
        assert await outbox.flush(2)
    assert publisher.published == ["u1:created", "u1:bytes-received", "u1:terminated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


async def test_one_process_per_directory(tmp_path: Path) -> None:
    async with FileOutbox(tmp_path, FakePublisher()):
        with pytest.raises(OutboxLocked):
            await FileOutbox(tmp_path, FakePublisher()).start()
    async with FileOutbox(tmp_path, FakePublisher()):
        pass  # the lock is released by close()


async def test_refused_event_goes_to_dead_letters_and_the_rest_flows(tmp_path: Path) -> None:
    publisher = FakePublisher()
    story = upload_story("u1", progress=1)
    poison = story[1].msg_id
    publisher.fail = lambda msg_id: (
        PublishError("too big", retryable=False) if msg_id == poison else None
    )
    async with FileOutbox(tmp_path, publisher) as outbox:
        for event in story:
            await outbox.record(event)
        assert await outbox.flush(2)
    assert publisher.published == [story[0].msg_id, story[2].msg_id]
    [dead] = (tmp_path / "dead").glob("*.json")
    assert json.loads(dead.read_bytes())["id"] == poison


async def test_retryable_failures_block_in_order_until_they_pass(tmp_path: Path) -> None:
    publisher = FakePublisher()
    failures = {"left": 3}

    def fail(msg_id: str) -> PublishError | None:
        if failures["left"] > 0:
            failures["left"] -= 1
            return BusUnavailable()
        return None

    publisher.fail = fail
    story = upload_story("u1")
    async with FileOutbox(tmp_path, publisher, backoff_initial=0.01) as outbox:
        for event in story:
            await outbox.record(event)
        assert await outbox.flush(2)
        assert outbox.failed_attempts == 3
    assert publisher.published == [e.msg_id for e in story]


async def test_names_keep_order_when_the_clock_is_behind(tmp_path: Path) -> None:
    created = one_of_each(upload_id="u1")[0]
    future = write_segment(tmp_path, events_lines([created]), time.time_ns() + 10**15).name
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()  # keep everything pending
    async with FileOutbox(tmp_path, publisher, backoff_initial=0.01) as outbox:
        await outbox.record(one_of_each(upload_id="u1")[2])
        names = pending_files(tmp_path)
        assert names[0] == future and len(names) == 2  # the new one sorts after it
        publisher.fail = lambda msg_id: None
        for callback in publisher.listeners:
            callback()  # "NATS is back"
        assert await outbox.flush(2)
    assert publisher.published == ["u1:created", "u1:bytes-received"]


async def test_record_after_close_is_refused(tmp_path: Path) -> None:
    outbox = FileOutbox(tmp_path, FakePublisher())
    await outbox.start()
    await outbox.close()
    with pytest.raises(OutboxClosed):
        await outbox.record(one_of_each()[0])


async def test_record_is_fast(tmp_path: Path) -> None:
    """Recording (with both fsyncs) is on the path of the final PATCH response."""
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        durations = []
        for i in range(100):
            started = time.perf_counter()
            await outbox.record(UploadCreated(**{**_fields(one_of_each()[0]), "upload_id": str(i)}))
            durations.append(time.perf_counter() - started)
        assert await outbox.flush(5)
    median = statistics.median(durations)
    print(f"record median {median * 1000:.2f} ms, p95 {sorted(durations)[94] * 1000:.2f} ms")
    # Typically ~1 ms on a local SSD (two fsyncs). The bound is loose so that a busy shared
    # disk does not fail the suite; the 5 ms last-byte-to-202 budget is measured in bench/.
    assert median < 0.010


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.data_fields()}


async def test_progress_events_stay_in_memory(tmp_path: Path) -> None:
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()
    async with FileOutbox(tmp_path, publisher, max_volatile=3) as outbox:
        for i in range(5):
            await outbox.record(UploadProgress(upload_id="u1", offset=i, size=10))
        assert pending_files(tmp_path) == []  # no disk write on the hot path
        assert (outbox.pending, outbox.dropped_volatile) == (3, 2)  # bounded while NATS is down
        await outbox.record(one_of_each(upload_id="u1")[2])
        assert pending_events(tmp_path) == ["u1:bytes-received"]
        publisher.fail = lambda msg_id: None
        outbox.kick()
        assert await outbox.flush(2)
    assert len(publisher.published) == 4
    assert publisher.published[-1] == "u1:bytes-received"  # still in recording order


class CountingOutbox(FileOutbox):
    writes = 0

    def _write(self, fd: int, data: bytes) -> None:
        self.writes += 1
        super()._write(fd, data)


@pytest.mark.parametrize("fsync", [True, False])
async def test_concurrent_records_are_committed_together_in_call_order(
    tmp_path: Path, fsync: bool
) -> None:
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()
    events = [one_of_each(upload_id=f"u{i}")[2] for i in range(50)]
    async with CountingOutbox(tmp_path, publisher, fsync=fsync) as outbox:
        await asyncio.gather(*(outbox.record(e) for e in events))
        assert outbox.writes < 10  # group commit: a few writes (and fsyncs), not 50
        assert len(pending_files(tmp_path)) == 1  # all appended to one segment
        assert pending_events(tmp_path) == [e.msg_id for e in events]
        publisher.fail = lambda msg_id: None
        outbox.kick()
        assert await outbox.flush(2)
    assert publisher.published == [e.msg_id for e in events]
    assert pending_files(tmp_path) == []


class FullDiskOutbox(FileOutbox):
    def _write(self, fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_full_disk_is_reported_to_the_caller(tmp_path: Path) -> None:
    async with FullDiskOutbox(tmp_path, FakePublisher()) as outbox:
        with pytest.raises(OutboxWriteFailed) as caught:
            await outbox.record(one_of_each()[2])
        assert caught.value.errno == errno.ENOSPC
        assert outbox.pending == 0


# -- the append-only segments: torn tails, acknowledgements, rotation, crashes --

REPO = Path(__file__).resolve().parents[2]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def received(count: int, prefix: str = "u") -> list[Event]:
    """`count` bytes-received events whose envelopes all have the same length."""
    return [one_of_each(upload_id=f"{prefix}{i:03d}")[2] for i in range(count)]


class Gate:
    """A Publisher passing the first `accept` events on to `inner`, then "NATS is down"."""

    def __init__(self, inner: EventBus, accept: int) -> None:
        self.inner = inner
        self.accept = accept
        self.sent: list[str] = []

    async def publish_raw(
        self, subject: str, payload: bytes, *, msg_id: str, timeout: float | None = None
    ) -> Any:
        if len(self.sent) >= self.accept:
            raise BusUnavailable()
        await self.inner.publish_raw(subject, payload, msg_id=msg_id, timeout=timeout)
        self.sent.append(msg_id)

    def add_connect_listener(self, callback: Callable[[], None]) -> None:
        pass


async def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path: Path) -> None:
    e1, e2, e3 = received(3)
    lines = events_lines([e1, e2, e3])
    path = write_segment(tmp_path, [*lines[:2], lines[2][:100]])  # killed in the third write
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: None if msg_id == e1.msg_id else BusUnavailable()
    async with FileOutbox(tmp_path, publisher, backoff_initial=0.01) as outbox:
        assert outbox.pending == 2
        await until(lambda: publisher.published == [e1.msg_id])
    # The half line was cut off before the ack line was appended: the ack line is whole...
    assert path.read_bytes() == b"".join([*lines[:2], segment_line("a", 1)])
    assert pending_events(tmp_path) == [e2.msg_id]
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        assert outbox.pending == 1  # ...and read at the next start
        assert await outbox.flush(2)
    assert publisher.published == [e2.msg_id]
    assert pending_files(tmp_path) == []


async def test_a_damaged_line_is_skipped_not_the_lines_after_it(tmp_path: Path) -> None:
    events = received(4)
    lines = events_lines(events)
    flipped = lines[1].replace(b"u001", b"u009", 1)  # a changed byte: the CRC does not match
    zeroed = b"\0" * 300 + lines[3]  # zeros where a write never reached the disk (power cut)
    write_segment(tmp_path, [lines[0], flipped, lines[2], zeroed])
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        assert await outbox.flush(2)
    assert publisher.published == [events[0].msg_id, events[2].msg_id, events[3].msg_id]


class HalfWriteOutbox(FileOutbox):
    """The next write stores half of its bytes, then the disk is full."""

    fail_next = False

    def _write(self, fd: int, data: bytes) -> None:
        if self.fail_next:
            self.fail_next = False
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write(fd, data)


async def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    a, b, c = received(3)
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()
    async with HalfWriteOutbox(tmp_path, publisher, backoff_initial=10) as outbox:
        await outbox.record(a)
        outbox.fail_next = True
        with pytest.raises(OutboxWriteFailed):
            await outbox.record(b)
        await outbox.record(c)  # appended where b's half line was
        assert outbox.pending == 2
    assert pending_events(tmp_path) == [a.msg_id, c.msg_id]  # every line whole (CRC checked)


async def test_restart_after_partial_acknowledgement_sends_only_the_rest(
    tmp_path: Path, bus: EventBus, nc: NATS
) -> None:
    events = received(8)
    first = Gate(bus, accept=5)
    async with FileOutbox(tmp_path, first, backoff_initial=0.01) as outbox:
        for event in events:
            await outbox.record(event)
        await until(lambda: len(first.sent) == 5)
    assert pending_events(tmp_path) == [e.msg_id for e in events[5:]]
    second = Gate(bus, accept=100)
    async with FileOutbox(tmp_path, second) as outbox:
        assert outbox.pending == 3
        assert await outbox.flush(5)
    assert second.sent == [e.msg_id for e in events[5:]]  # the acknowledged ones not again
    assert await msg_id_counts(nc) == {e.msg_id: 1 for e in events}
    assert pending_files(tmp_path) == []


async def spawn(script: str, *args: object) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *map(str, args),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


PARTIAL_ACK_CHILD = """
import asyncio, sys
from events.errors import BusUnavailable
from events.outbox import FileOutbox
from tests.events.samples import one_of_each

directory, accept, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Gate:
    sent = 0
    async def publish_raw(self, subject, payload, *, msg_id, timeout=None):
        if self.sent >= accept:
            raise BusUnavailable()
        self.sent += 1
    def add_connect_listener(self, callback):
        pass

async def main():
    gate = Gate()
    outbox = FileOutbox(directory, gate, backoff_initial=0.01)
    await outbox.start()
    for i in range(count):
        await outbox.record(one_of_each(upload_id=f"u{i:03d}")[2])
    while gate.sent < accept:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    print("ready", flush=True)
    await asyncio.sleep(60)  # killed here: never closed

asyncio.run(main())
"""


async def test_acknowledged_events_are_not_sent_again_after_kill_9(tmp_path: Path) -> None:
    child = await spawn(PARTIAL_ACK_CHILD, tmp_path, 30, 50)
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
    child.send_signal(signal.SIGKILL)
    await child.communicate()
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        assert outbox.pending == 20
        assert await outbox.flush(2)
    assert publisher.published == [e.msg_id for e in received(50)[30:]]


RECORDING_CHILD = """
import asyncio, sys
from events.bus import EventBus
from events.outbox import FileOutbox
from tests.events.samples import one_of_each

async def main():
    directory, url, prefix, fsync = sys.argv[1:]
    bus = EventBus(url, reconnect_wait=0.1)
    await bus.start(wait=5)
    async with FileOutbox(directory, bus, fsync=fsync == "1", segment_bytes=16384) as outbox:
        for i in range(10**9):
            created, _, received, *_ = one_of_each(upload_id=f"{prefix}{i}")
            for event in (created, received):
                await outbox.record(event)
                sys.stdout.write(event.msg_id + "\\n")  # record() returned: it must get through
                sys.stdout.flush()

asyncio.run(main())
"""


@pytest.mark.parametrize("fsync", [False, True])
async def test_kill_9_at_any_moment_loses_and_doubles_nothing(
    tmp_path: Path, bus: EventBus, nats_url: str, nc: NATS, fsync: bool
) -> None:
    recorded: list[str] = []
    for round_no in range(4):  # each run starts with what the killed one left behind
        child = await spawn(RECORDING_CHILD, tmp_path, nats_url, f"r{round_no}-", int(fsync))
        assert child.stdout is not None
        for _ in range(20):  # recording (and relaying) is under way
            recorded.append((await asyncio.wait_for(child.stdout.readline(), 30)).decode())
        await asyncio.sleep(random.uniform(0, 0.3))
        child.send_signal(signal.SIGKILL)
        rest, _ = await child.communicate()
        recorded += rest.decode().splitlines(keepends=True)
    recorded = [line[:-1] for line in recorded if line.endswith("\n")]  # whole lines only
    assert len(recorded) > 100
    async with FileOutbox(tmp_path, bus) as outbox:
        assert await outbox.flush(10)
    counts = await msg_id_counts(nc)
    assert [m for m in recorded if counts[m] != 1] == []  # every recorded event, once
    assert {m: n for m, n in counts.items() if n != 1} == {}  # and nothing twice
    assert pending_files(tmp_path) == []


async def test_segments_rotate_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    events = received(11)
    line = len(events_lines(events)[0])
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()  # an outage: nothing is acknowledged
    async with FileOutbox(
        tmp_path, publisher, segment_bytes=3 * line, backoff_initial=0.01
    ) as outbox:
        for event in events:
            await outbox.record(event)
        assert len(pending_files(tmp_path)) == 4  # 3 + 3 + 3 + 2 events
        assert pending_events(tmp_path) == [e.msg_id for e in events]
        last = pending_files(tmp_path)[-1]
        publisher.fail = lambda msg_id: None
        outbox.kick()
        assert await outbox.flush(2)
        await until(lambda: pending_files(tmp_path) == [last])  # the full ones are deleted
        assert pending_events(tmp_path) == []  # the active one says all is done
        await outbox.record(one_of_each(upload_id="u999")[2])
        assert pending_files(tmp_path) == [last]  # and takes the next events
        assert await outbox.flush(2)
    assert pending_files(tmp_path) == []  # close deletes it: everything in it is done
    assert publisher.published == [e.msg_id for e in events] + ["u999:bytes-received"]


async def test_an_idle_acknowledged_segment_is_deleted_after_segment_age(tmp_path: Path) -> None:
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher, segment_age=0.5) as outbox:
        await outbox.record(received(1)[0])
        assert await outbox.flush(2)
        assert len(pending_files(tmp_path)) == 1  # young: the next events go there
        await until(lambda: pending_files(tmp_path) == [], 3)
        await outbox.record(received(2)[1])
        assert len(pending_files(tmp_path)) == 1
        assert await outbox.flush(2)


class WatchedOutbox(FileOutbox):
    created: list[str]

    def _create(self, segment: Any) -> None:
        self.created.append(segment.path.name)
        super()._create(segment)


@pytest.mark.parametrize("fsync", [True, False])
async def test_steady_traffic_creates_no_file_per_event(tmp_path: Path, fsync: bool) -> None:
    publisher = FakePublisher()
    events = received(200)
    outbox = WatchedOutbox(tmp_path, publisher, fsync=fsync)
    outbox.created = []
    async with outbox:
        for i, event in enumerate(events):
            await outbox.record(event)
            if i % 10 == 9:
                assert await outbox.flush(2)  # the relay keeps up: acknowledged as we go
                await until(lambda: pending_events(tmp_path) == [])  # and noted on disk
        assert len(pending_files(tmp_path)) == 1
    assert len(outbox.created) == 1
    assert publisher.published == [e.msg_id for e in events]


async def test_a_busy_relay_notes_progress_every_ack_every_events(tmp_path: Path) -> None:
    stop_at = ACK_EVERY + 5
    release = asyncio.Event()

    class Stalling(FakePublisher):
        async def publish_raw(
            self, subject: str, payload: bytes, *, msg_id: str, timeout: float | None = None
        ) -> Any:
            if len(self.published) == stop_at:
                await release.wait()
            await super().publish_raw(subject, payload, msg_id=msg_id, timeout=timeout)

    publisher = Stalling()
    events = received(ACK_EVERY + 10)
    async with FileOutbox(tmp_path, publisher) as outbox:
        await asyncio.gather(*(outbox.record(e) for e in events))  # the relay is never idle
        await until(lambda: len(publisher.published) == stop_at)
        await until(lambda: len(pending_events(tmp_path)) <= len(events) - ACK_EVERY)
        release.set()
        assert await outbox.flush(2)
    assert publisher.published == [e.msg_id for e in events]
