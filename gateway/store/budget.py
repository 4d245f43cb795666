"""A byte budget shared by the requests of one process: memory that must not grow with load.

The S3 store holds part buffers in memory (s3store.py). Each PATCH needs at most two at a time,
but a gateway serving many PATCHes at once would need two per request -- 32 concurrent uploads
with 8 MiB parts is over 500 MiB. The budget caps the sum: a request takes a part's worth before
it starts receiving into a new buffer and gives it back once that buffer has been uploaded. A
request that finds the budget spent stops reading its body (TCP back-pressure slows its client)
until others give some back; after `wait` seconds it gives up with BudgetExhausted (503, the
client resumes later) -- never an unbounded wait.

No deadlock: a request waits only while it holds no buffer it is still filling, and the buffers
that others hold are each on their way to S3, which returns them whatever this request does.
"""

from __future__ import annotations

import asyncio
import collections

from gateway.store.base import StoreUnavailable

__all__ = ["BudgetExhausted", "ByteBudget"]


class BudgetExhausted(StoreUnavailable):
    """No room in the budget within the wait: the instance is busy; retry later."""


class ByteBudget:
    """`limit` bytes shared by everyone; `take(n)` waits for room, `give(n)` returns it.
    Waiters are served first come, first served, so a large request is not starved."""

    def __init__(self, limit: int, *, wait: float = 30.0) -> None:
        if limit <= 0:
            raise ValueError("a budget needs a positive limit")
        self.limit = limit
        self.wait = wait
        self.in_use = 0
        self.peak = 0  # the most ever taken at once (for tests and metrics)
        self.waits = 0  # takes that had to wait for room
        self.exhausted = 0  # takes that gave up (BudgetExhausted)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def fit(self, n: int) -> int:
        """What a request asking for `n` takes: never more than the whole budget."""
        return min(n, self.limit)

    async def take(self, n: int) -> None:
        """Take `n` bytes (at most `limit`) once they are free; BudgetExhausted after `wait`."""
        n = self.fit(n)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        self._grant()
        if not granted.done():
            self.waits += 1
        try:
            await asyncio.wait_for(granted, self.wait)
        except TimeoutError:
            self.exhausted += 1
            raise BudgetExhausted(
                f"all {self.limit} bytes of part buffers are in use; retry later"
            ) from None
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give(n)  # granted just as we were cancelled: not ours to keep
            raise

    def give(self, n: int) -> None:
        """Return `n` bytes taken before (the same amount `take` was asked for)."""
        self.in_use -= self.fit(n)
        assert self.in_use >= 0, "gave back more than was taken"
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, granted = self._waiters[0]
            if granted.done():  # timed out or cancelled meanwhile
                self._waiters.popleft()
                continue
            if self.in_use + n > self.limit:
                return
            self._waiters.popleft()
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            granted.set_result(None)
