"""A request body as the store sees it: counted, limited, hashed and watched for stalls.

`request.content` is read in pieces of at most `buffer_size` bytes. Each piece is handed to the
store, and nothing more is read from the socket until the store has taken it: that await is the
back-pressure, and it bounds the memory of a request by the buffer whatever the upload size.

aiohttp's `client_max_size` does not cover `request.content`, so the length limit is enforced
here: bytes up to the limit are handed on (and kept), then the reader stops and says `exceeded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from aiohttp import web

from gateway import errors
from gateway.errors import ErrorSpec, TusError
from gateway.tus.checksums import Hasher

__all__ = ["BodyReader"]

PROGRESS_INTERVAL = 1.0  # seconds: at most one upload.progress per upload per second (SPEC §5)
THREAD_HASH_MIN = 128 * 1024  # smaller pieces hash faster inline than a thread hand-off costs


def _update(hashers: list[Hasher], chunk: bytes) -> None:
    for hasher in hashers:
        hasher.update(chunk)


class _Interrupted(asyncio.TimeoutError):
    """What an interrupted body read raises inside aiohttp's stream. A TimeoutError on purpose:
    when aiohttp drains the unread rest of the body after the handler answered, it treats a
    TimeoutError as "stop draining, close the connection" instead of logging an unhandled error.
    """


class BodyReader:
    def __init__(
        self,
        request: web.Request,
        *,
        limit: int,
        buffer_size: int,
        idle_timeout: float,
        hashers: list[Hasher] | None = None,
        on_progress: Callable[[int], Awaitable[None]] | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        hash_executor: Executor | None = None,
    ) -> None:
        self._content = request.content
        self.limit = limit
        self.buffer_size = buffer_size
        self.idle_timeout = idle_timeout
        self.hashers = hashers or []
        self.received = 0
        self.exceeded = False
        self.finished = False  # the body was read to its end (not cut off, not interrupted)
        self.failure: TusError | None = None  # why reading stopped early, if we stopped it
        self._last_activity = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_progress = on_progress
        self._progress_interval = progress_interval
        self._hash_executor = hash_executor

    def interrupt(self, spec: ErrorSpec) -> None:
        """End the read from outside (lock takeover, idle timeout): the pending read raises."""
        if self.failure is None and not self.finished:
            self.failure = spec.error()
            self._content.set_exception(_Interrupted(self.failure.reason))

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_activity
        if idle >= self.idle_timeout:
            self.interrupt(errors.IDLE_TIMEOUT)
        else:
            self._watchdog = loop.call_later(self.idle_timeout - idle, self._watch)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        self._last_activity = last_progress = loop.time()
        # One timer per request, re-armed lazily, instead of a timeout around every read.
        self._watchdog = loop.call_later(self.idle_timeout, self._watch)
        # Hashing a large piece runs in a thread (hashlib releases the GIL) while the store
        # writes it and the next piece is read: the hash is never on the critical path. The
        # pieces are hashed strictly in order, one at a time.
        hashing: asyncio.Future[None] | None = None
        try:
            while True:
                try:
                    chunk = await self._content.read(self.buffer_size)
                except _Interrupted:
                    assert self.failure is not None
                    raise self.failure from None
                if not chunk:
                    self.finished = True
                    return
                self._last_activity = loop.time()
                room = self.limit - self.received
                if len(chunk) > room:
                    chunk = chunk[:room]
                    self.exceeded = True
                if chunk:
                    self.received += len(chunk)
                    if hashing is not None:
                        await hashing
                        hashing = None
                    if self._hash_executor is not None and len(chunk) >= THREAD_HASH_MIN:
                        hashing = loop.run_in_executor(self._hash_executor, _update, self.hashers, chunk)
                    else:
                        _update(self.hashers, chunk)
                    yield chunk
                    if self._on_progress and self._last_activity - last_progress >= self._progress_interval:
                        last_progress = self._last_activity
                        await self._on_progress(self.received)
                if self.exceeded:
                    return
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if hashing is not None:
                await hashing  # digests are read as soon as the body ends
