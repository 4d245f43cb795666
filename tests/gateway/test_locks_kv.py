"""The shared one-writer lock in NATS KV, across two "instances" (two buses, two lockers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from events.bus import EventBus
from gateway.locks import LockBusy
from gateway.locks_kv import LOCK_TTL, KvLocker

UPLOAD = "ab" * 16


@pytest.fixture
async def two_lockers(nats_url: str) -> AsyncIterator[tuple[KvLocker, KvLocker]]:
    buses = [EventBus(nats_url, name=f"instance-{i}") for i in range(2)]
    lockers = []
    for bus in buses:
        assert await bus.start(wait=5)
        locker = KvLocker(bus, timeout=LOCK_TTL * 3)
        await locker.start()
        lockers.append(locker)
    yield lockers[0], lockers[1]
    for locker in lockers:
        await locker.close()
    for bus in buses:
        await bus.close()


async def test_newcomer_on_another_instance_takes_over(two_lockers: tuple[KvLocker, KvLocker]) -> None:
    a, b = two_lockers
    asked = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with a.hold(UPLOAD, asked.set):
            order.append("a in")
            await release.wait()  # a request that only ends when asked to
            order.append("a out")

    task = asyncio.create_task(holder())
    while not order:
        await asyncio.sleep(0.01)
    asked_wait = asyncio.create_task(asked.wait())

    async def newcomer() -> None:
        async with b.hold(UPLOAD):
            order.append("b in")

    b_task = asyncio.create_task(newcomer())
    await asyncio.wait_for(asked_wait, 5)  # A was told to stop...
    assert order == ["a in"]  # ...and B does not get in while A still holds
    release.set()
    await asyncio.wait_for(asyncio.gather(task, b_task), 10)
    assert order == ["a in", "a out", "b in"]


async def test_lock_of_a_crashed_instance_expires(two_lockers: tuple[KvLocker, KvLocker], nats_url: str) -> None:
    _, b = two_lockers
    crashed = EventBus(nats_url, name="crashed")
    assert await crashed.start(wait=5)
    kv = await KvLocker(crashed)._bucket()
    await kv.create(f"upload.{UPLOAD}", b"a process that died")  # never refreshed, never deleted
    await crashed.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with b.hold(UPLOAD):
        waited = loop.time() - started
    assert waited > 0.5  # it really was held...
    assert waited < LOCK_TTL * 3  # ...and aged out instead of blocking forever


async def test_busy_when_the_holder_never_lets_go(nats_url: str) -> None:
    buses = [EventBus(nats_url, name=f"i{i}") for i in range(2)]
    for bus in buses:
        await bus.start(wait=5)
    stubborn, impatient = KvLocker(buses[0], timeout=10), KvLocker(buses[1], timeout=0.5)
    await stubborn.start()
    await impatient.start()
    try:
        async with stubborn.hold(UPLOAD):  # no release callback: cannot be taken over
            with pytest.raises(LockBusy):
                async with impatient.hold(UPLOAD):
                    pass
        async with impatient.hold(UPLOAD):  # released: free again at once
            pass
    finally:
        for locker in (stubborn, impatient):
            await locker.close()
        for bus in buses:
            await bus.close()
