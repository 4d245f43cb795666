"""One writer per upload, with takeover (tusd v2 semantics).

A request that needs an upload asks for its lock. If an earlier request holds it, the holder is
asked to stop (its `on_release_requested` callback ends its body read, it commits what it has and
releases), and the newcomer gets the lock as soon as that happened. Only when the holder does not
let go within `timeout` does the newcomer get `LockBusy` (423). A stuck client therefore cannot
block its own retry until some idle timeout passes.

This locker lives in one process: right for the filesystem store, which one instance owns. With
the S3 store, instances share uploads and `gateway.locks_kv.KvLocker` (NATS KV) takes its place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

__all__ = ["LocalLocker", "LockBusy", "Locker"]


class LockBusy(Exception):
    """The holder did not release the upload in time."""


class Locker(Protocol):
    def hold(
        self, upload_id: str, on_release_requested: Callable[[], None] | None = None
    ) -> AbstractAsyncContextManager[None]: ...

    def is_held(self, upload_id: str) -> bool:
        """Held by a request of this process (the expiry sweeper skips such uploads)."""
        ...


class _Holder:
    __slots__ = ("asked", "on_release_requested", "released")

    def __init__(self, on_release_requested: Callable[[], None] | None) -> None:
        self.released = asyncio.Event()
        self.on_release_requested = on_release_requested
        self.asked = False

    def ask_to_release(self) -> None:
        if not self.asked and self.on_release_requested is not None:
            self.asked = True
            self.on_release_requested()


class LocalLocker:
    def __init__(self, *, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._holders: dict[str, _Holder] = {}

    def is_held(self, upload_id: str) -> bool:
        return upload_id in self._holders

    @asynccontextmanager
    async def hold(
        self, upload_id: str, on_release_requested: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (holder := self._holders.get(upload_id)) is not None:
            holder.ask_to_release()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LockBusy(upload_id)
            try:
                await asyncio.wait_for(holder.released.wait(), remaining)
            except TimeoutError:
                raise LockBusy(upload_id) from None
            # Several may have waited for the same holder; the loop lets exactly one in.
        mine = _Holder(on_release_requested)
        self._holders[upload_id] = mine
        try:
            yield
        finally:
            if self._holders.get(upload_id) is mine:
                del self._holders[upload_id]
            mine.released.set()
