"""The outbox: durable before the response, relayed in order, nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import errno
import json
import statistics
import time
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
from events.natsd import EmbeddedNats, free_port
from events.outbox import FileOutbox, Outbox
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
    return sorted(p.name for p in directory.glob("*.jsonl"))


def pending_events(directory: Path) -> list[str]:
    """Msg ids stored in the outbox directory, in relay order."""
    return [
        json.loads(line)["id"]
        for name in pending_files(directory)
        for line in (directory / name).read_bytes().splitlines()
    ]


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
    down = EventBus(f"nats://127.0.0.1:{free_port()}", reconnect_wait=0.1)
    await down.start()
    story = upload_story(new_id())
    async with FileOutbox(tmp_path, down) as outbox:
        for event in story:
            await outbox.record(event)
        assert not await outbox.flush(0.2)
    await down.close()
    durable = [e.msg_id for e in story if e.DURABLE]
    assert pending_events(tmp_path) == durable  # "crash": the files stay, progress is gone

    async with FileOutbox(tmp_path, bus) as outbox:
        assert outbox.pending == len(durable)
        assert await outbox.flush(5)
    messages = await stream_messages(nc)
    assert [env["id"] for _, env in messages] == durable


async def test_crash_between_puback_and_delete_is_a_dropped_duplicate(
    tmp_path: Path, bus: EventBus, nc: NATS
) -> None:
    event = one_of_each()[2]
    await bus.publish(event)  # it reached the stream...
    (tmp_path / f"{time.time_ns():023d}.jsonl").write_bytes(event.to_json_bytes())  # ...file stays
    async with FileOutbox(tmp_path, bus) as outbox:
        assert await outbox.flush(5)
    assert await msg_id_counts(nc) == {event.msg_id: 1}
    assert pending_files(tmp_path) == []


async def test_half_written_files_are_discarded_at_start(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000000001.tmp").write_bytes(b'{"specversion":')
    publisher = FakePublisher()
    async with FileOutbox(tmp_path, publisher) as outbox:
        assert outbox.pending == 0
    assert list(tmp_path.glob("*.tmp")) == []


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
    future = f"{time.time_ns() + 10**15:023d}.jsonl"  # a file from a clock far ahead
    created = one_of_each(upload_id="u1")[0]
    (tmp_path / future).write_bytes(created.to_json_bytes())
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


async def test_concurrent_records_are_committed_together_in_call_order(tmp_path: Path) -> None:
    publisher = FakePublisher()
    publisher.fail = lambda msg_id: BusUnavailable()
    events = [one_of_each(upload_id=f"u{i}")[2] for i in range(50)]
    async with FileOutbox(tmp_path, publisher) as outbox:
        await asyncio.gather(*(outbox.record(e) for e in events))
        assert len(pending_files(tmp_path)) < 10  # group commit: a few fsyncs, not 50
        assert pending_events(tmp_path) == [e.msg_id for e in events]
        publisher.fail = lambda msg_id: None
        outbox.kick()
        assert await outbox.flush(2)
    assert publisher.published == [e.msg_id for e in events]
    assert pending_files(tmp_path) == []


class FullDiskOutbox(FileOutbox):
    def _write_durably(self, name: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_full_disk_is_reported_to_the_caller(tmp_path: Path) -> None:
    async with FullDiskOutbox(tmp_path, FakePublisher()) as outbox:
        with pytest.raises(OutboxWriteFailed) as caught:
            await outbox.record(one_of_each()[2])
        assert caught.value.errno == errno.ENOSPC
        assert outbox.pending == 0
