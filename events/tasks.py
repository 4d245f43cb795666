"""Stopping background tasks for sure.

`task.cancel(); await task` assumes the cancel arrives. It can be lost: on Python 3.11,
`asyncio.wait_for` (inside nats-py's `next_msg`, requests and KV calls) returns the awaited
result when a cancel comes just as that result is ready (python/cpython#86296, fixed in 3.12),
and nats-py turns a cancel into ConnectionClosedError on a closed connection. A loop that lost
its cancel goes on to its next wait -- possibly forever with NATS down -- and the shutdown
that awaits it hangs. `stop_task` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["stop_task"]

log = logging.getLogger("tusgate")

RECANCEL_EVERY = 0.5  # seconds between cancels while the task has not ended


async def stop_task(task: asyncio.Task[Any], *, patience: float = 10.0) -> None:
    """Cancel `task` and wait until it has ended, cancelling again every RECANCEL_EVERY
    seconds (a cancel can be lost), for at most `patience` seconds. Raises what the task
    raised, unless that is its cancellation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_EVERY)
        if not task.done() and loop.time() >= deadline:
            log.warning("task %s did not stop within %.0f s; leaving it", task.get_name(), patience)
            return
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
