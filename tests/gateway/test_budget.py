"""The byte budget that caps the S3 store's part buffers per instance."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.budget import BudgetExhausted, ByteBudget


async def test_take_waits_for_room_first_come_first_served() -> None:
    budget = ByteBudget(10, wait=5)
    await budget.take(6)
    order: list[str] = []

    async def taker(name: str, n: int) -> None:
        await budget.take(n)
        order.append(name)

    big = asyncio.create_task(taker("big", 8))
    await asyncio.sleep(0.01)
    small = asyncio.create_task(taker("small", 2))  # would fit now, but comes after big
    await asyncio.sleep(0.01)
    assert order == [] and budget.in_use == 6
    budget.give(6)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.in_use == 10 and budget.peak == 10


async def test_take_gives_up_after_the_wait_and_leaves_nothing_taken() -> None:
    budget = ByteBudget(10, wait=0.05)
    await budget.take(10)
    with pytest.raises(BudgetExhausted):
        await budget.take(1)
    budget.give(10)
    await budget.take(10)  # the timed-out waiter holds nothing and blocks nobody
    assert budget.in_use == 10


async def test_more_than_the_limit_takes_the_whole_budget() -> None:
    budget = ByteBudget(10, wait=1)
    await budget.take(25)
    assert budget.in_use == 10
    budget.give(25)
    assert budget.in_use == 0


async def test_a_cancelled_waiter_takes_nothing() -> None:
    budget = ByteBudget(10, wait=5)
    await budget.take(10)
    waiter = asyncio.create_task(budget.take(5))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    budget.give(10)
    assert budget.in_use == 0
