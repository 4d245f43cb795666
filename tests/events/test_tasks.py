"""stop_task: a background task is stopped even when it loses a cancel."""

from __future__ import annotations

import asyncio

import pytest

from events.tasks import stop_task


async def test_a_task_that_swallows_its_first_cancel_is_stopped() -> None:
    swallowed = asyncio.Event()

    async def loop_that_loses_a_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.set()  # what Python 3.11's wait_for can do: the cancel is gone
        await asyncio.Event().wait()  # ... and the loop goes on to wait forever

    task = asyncio.create_task(loop_that_loses_a_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 5)
    assert swallowed.is_set() and task.cancelled()


async def test_what_the_task_raised_is_raised() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await stop_task(task)


async def test_a_task_that_never_stops_is_left_after_the_patience() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, patience=0.6), 5)
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=2)
