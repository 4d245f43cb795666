"""OutcomeWaiters: one subscription, futures by id, late waiters, outcomes missed in an outage."""

from __future__ import annotations

import asyncio
import time

import nats

from events.bus import EventBus
from events.model import ProcessingAborted, ProcessingFinished, ProcessingProgress
from events.natsd import EmbeddedNats
from events.waiters import OutcomeWaiters
from tests.events.samples import SHA256, T0, new_id


# A fixed event_time: equal events compare equal.
def finished(upload_id: str) -> ProcessingFinished:
    return ProcessingFinished(
        id=upload_id, destination={"local": {"path": f"/out/{upload_id}"}}, item_id=None,
        web_url=None, size=3, sha256=SHA256, event_time=T0,
    )  # fmt: skip


def aborted(upload_id: str) -> ProcessingAborted:
    return ProcessingAborted(
        id=upload_id, code="too_large", message="over 1 GiB", retryable=False, event_time=T0
    )


async def test_waiters_get_finished_and_aborted(bus: EventBus) -> None:
    async with OutcomeWaiters(bus) as waiters:
        ok_id, bad_id, other_id = new_id(), new_id(), new_id()
        ok = asyncio.create_task(waiters.wait(ok_id, 5))
        bad = asyncio.create_task(waiters.wait(bad_id, 5))
        other = asyncio.create_task(waiters.wait(other_id, 0.3))
        await asyncio.sleep(0)
        assert waiters.waiting == 3
        await bus.publish(ProcessingProgress(id=ok_id, step="processing", bytes_done=1,
                                             bytes_total=3, percent=33.3))  # fmt: skip
        await bus.publish(finished(ok_id))
        await bus.publish(aborted(bad_id))
        started = time.monotonic()
        assert await ok == finished(ok_id)
        assert await bad == aborted(bad_id)
        assert time.monotonic() - started < 1  # pushed, not polled
        assert await other is None  # timeout: the gateway answers 202
        assert waiters.waiting == 0


async def test_many_waiters_for_one_id(bus: EventBus) -> None:
    async with OutcomeWaiters(bus) as waiters:
        uid = new_id()
        tasks = [asyncio.create_task(waiters.wait(uid, 5)) for _ in range(3)]
        await asyncio.sleep(0)
        await bus.publish(finished(uid))
        assert await asyncio.gather(*tasks) == [finished(uid)] * 3


async def test_registered_before_recording(bus: EventBus) -> None:
    async with OutcomeWaiters(bus) as waiters:
        uid = new_id()
        with waiters.expect(uid) as waiter:
            await bus.publish(finished(uid))  # the outcome races ahead of the wait() call
            await asyncio.sleep(0.1)
            assert await waiter.wait(0) == finished(uid)
        assert waiters.waiting == 0


async def test_late_waiter_gets_a_recent_outcome(bus: EventBus) -> None:
    async with OutcomeWaiters(bus) as waiters:
        uid = new_id()
        await bus.publish(aborted(uid))
        for _ in range(100):
            if waiters.recent(uid) is not None:
                break
            await asyncio.sleep(0.01)
        assert await waiters.wait(uid, 0.01) == aborted(uid)


async def test_recent_outcomes_are_bounded(bus: EventBus) -> None:
    async with OutcomeWaiters(bus, recent_size=2) as waiters:
        ids = [new_id() for _ in range(3)]
        for uid in ids:
            await bus.publish(finished(uid))
        assert await waiters.wait(ids[2], 5) is not None
        assert waiters.recent(ids[0]) is None


async def test_close_releases_waiters_with_none(bus: EventBus) -> None:
    waiters = OutcomeWaiters(bus)
    await waiters.start()
    task = asyncio.create_task(waiters.wait(new_id(), 30))
    await asyncio.sleep(0)
    await waiters.close()
    assert await asyncio.wait_for(task, 1) is None


async def test_outcome_published_while_disconnected_is_replayed(
    nats_server: EmbeddedNats,
) -> None:
    # Slow reconnection: the outcome is published before this bus is back, so the core
    # subscription misses it and only the replay from the stream can deliver it.
    bus = EventBus(nats_server.url, reconnect_wait=1.5)
    await bus.start(wait=5)
    assert await bus.wait_stream(5)
    try:
        async with OutcomeWaiters(bus) as waiters:
            uid = new_id()
            with waiters.expect(uid) as waiter:
                await nats_server.astop()
                await nats_server.astart()
                other = await nats.connect(nats_server.url)
                try:
                    await other.jetstream().publish(
                        finished(uid).nats_subject,
                        finished(uid).to_json_bytes(),
                        headers={"Nats-Msg-Id": finished(uid).msg_id},
                    )
                finally:
                    await other.close()
                assert not bus.connected
                assert await waiter.wait(8) == finished(uid)
    finally:
        await bus.close()
