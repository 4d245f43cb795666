"""EventBus and the TUSGATE stream: idempotent set-up, dedup by Msg-Id, outages, subscribing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType

from events.bus import (
    DEFAULT_DUPLICATE_WINDOW,
    STREAM_NAME,
    EventBus,
    ensure_stream,
)
from events.errors import BusUnavailable
from events.model import Event, ProcessingFinished, UploadProgress
from events.natsd import EmbeddedNats, free_port
from tests.events.samples import one_of_each
from tests.events.streamtools import msg_id_counts, stream_messages


async def test_ensure_stream_is_idempotent_and_repairs_drift(nc: NATS) -> None:
    js = nc.jetstream()
    first = await ensure_stream(js)
    for _ in range(3):
        again = await ensure_stream(js)
        assert again.config == first.config
    assert first.config.subjects == ["tusgate.>"]
    assert first.config.storage == StorageType.FILE
    assert first.config.duplicate_window == DEFAULT_DUPLICATE_WINDOW

    await js.publish("tusgate.x.v1", b"{}")
    # An operator changes a setting we own and one we do not.
    await js.update_stream(
        dataclasses.replace(first.config, duplicate_window=30.0, max_bytes=10_000_000)
    )
    repaired = await ensure_stream(js)
    assert repaired.config.duplicate_window == DEFAULT_DUPLICATE_WINDOW
    assert repaired.config.max_bytes == 10_000_000  # kept
    assert (await js.stream_info(STREAM_NAME)).state.messages == 1  # nothing lost


async def test_concurrent_ensure_stream(nc: NATS) -> None:
    js = nc.jetstream()
    results = await asyncio.gather(*(ensure_stream(js) for _ in range(5)))
    assert len({r.config.name for r in results}) == 1


async def test_duplicate_msg_id_is_dropped(bus: EventBus, nc: NATS) -> None:
    events = one_of_each()
    for event in events:
        first = await bus.publish(event)
        assert not first.duplicate
        second = await bus.publish(event)
        assert second.duplicate and second.seq == first.seq
    counts = await msg_id_counts(nc)
    assert sum(counts.values()) == len(events)
    assert set(counts.values()) == {1}
    # A new progress event is a new message, even with the same content.
    progress = UploadProgress(upload_id="u", offset=1, size=2)
    await bus.publish(progress)
    await bus.publish(dataclasses.replace(progress, event_id=""))
    assert sum((await msg_id_counts(nc)).values()) == len(events) + 2


async def test_messages_carry_headers_and_envelope(bus: EventBus, nc: NATS) -> None:
    event = one_of_each()[2]
    await bus.publish(event)
    js = nc.jetstream()
    msg = await js.get_msg(STREAM_NAME, 1)
    assert msg.subject == "tusgate.upload.bytes-received.v1"
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == event.msg_id
    assert msg.headers["Content-Type"] == "application/cloudevents+json"
    [(msg_id, envelope)] = await stream_messages(nc)
    assert envelope["id"] == msg_id == f"{event.subject}:bytes-received"


async def test_bus_starts_without_nats_and_connects_later(tmp_path: Path) -> None:
    port = free_port()
    bus = EventBus(f"nats://127.0.0.1:{port}", reconnect_wait=0.1, connect_timeout=0.5)
    try:
        assert await bus.start(wait=0.3) is False  # no crash, no exception
        with pytest.raises(BusUnavailable):
            await bus.publish(one_of_each()[0])
        async with EmbeddedNats(tmp_path, port=port):
            assert await bus.wait_connected(5)
            assert await bus.wait_stream(5)
            ack = await bus.publish(one_of_each()[0])
            assert ack.seq == 1
    finally:
        await bus.close()


async def test_bus_survives_a_nats_restart(nats_server: EmbeddedNats, bus: EventBus) -> None:
    await bus.publish(one_of_each()[0])
    await nats_server.astop()
    with pytest.raises(BusUnavailable):
        for _ in range(50):  # the client notices the lost socket within moments
            await bus.publish(UploadProgress(upload_id="u", offset=1, size=None), timeout=0.5)
            await asyncio.sleep(0.05)
    await nats_server.astart()
    assert await bus.wait_connected(5)
    ack = await bus.publish(one_of_each()[2])
    assert ack.stream == STREAM_NAME and not ack.duplicate


async def test_close_while_connecting_leaves_nothing_behind() -> None:
    bus = EventBus(f"nats://127.0.0.1:{free_port()}", reconnect_wait=0.05)
    await bus.start()
    await asyncio.sleep(0.2)
    await bus.close()  # filterwarnings=error would flag an unclosed transport


async def test_subscribe_gets_parsed_events_and_skips_junk(bus: EventBus, nc: NATS) -> None:
    got: list[Event] = []
    events = [e for e in one_of_each() if e.NAME.startswith("processing.")]
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        got.append(event)
        if len(got) == len(events):
            done.set()

    sub = await bus.subscribe("tusgate.processing.>", handler)
    await nc.publish("tusgate.processing.finished.v1", b"not an event")
    for event in events:
        await bus.publish(event)
    await asyncio.wait_for(done.wait(), 5)
    assert got == events  # in order, junk skipped
    assert isinstance(got[-2], ProcessingFinished)
    await sub.unsubscribe()


async def test_subscribe_before_first_connection(tmp_path: Path) -> None:
    port = free_port()
    bus = EventBus(f"nats://127.0.0.1:{port}", reconnect_wait=0.1)
    got: asyncio.Queue[Event] = asyncio.Queue()

    async def handler(event: Event) -> None:
        await got.put(event)

    try:
        await bus.start()
        await bus.subscribe("tusgate.>", handler)  # deferred until NATS is there
        async with EmbeddedNats(tmp_path, port=port):
            assert await bus.wait_stream(5)
            event = one_of_each()[0]
            await bus.publish(event)
            assert await asyncio.wait_for(got.get(), 5) == event
    finally:
        await bus.close()


async def test_iterate_reads_history_then_follows(bus: EventBus) -> None:
    events = one_of_each()
    for event in events[:3]:
        await bus.publish(event)
    seen: list[Event] = []
    async with contextlib.aclosing(bus.iterate("tusgate.upload.>")) as stream:
        async for event in stream:
            seen.append(event)
            if len(seen) == 3:
                await bus.publish(events[3])  # published while following
            if len(seen) == 4:
                break
    assert seen == events[:4]
