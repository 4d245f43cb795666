"""Concurrent uploads per owner (SPEC §4 "Limits"): at most N request bodies of one owner
stream into this instance at once; one more is answered 429 before a byte is read.

Counted per instance (as a proxy's connection limit is): instances share nothing here, so
behind a load balancer an owner may have N per instance. A request that takes over a stuck
one (the same upload) never counts twice: the stuck one has ended before the lock is granted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from gateway import errors

__all__ = ["OwnerSlots"]


class OwnerSlots:
    """`held(owner)`: raises TOO_MANY_UPLOADS past `limit` bodies of `owner` at once (0: no
    limit), else counts this one until the block ends."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active: Counter[str] = Counter()

    @contextmanager
    def held(self, owner: str) -> Iterator[None]:
        if self.limit and self.active[owner] >= self.limit:
            raise errors.TOO_MANY_UPLOADS.error(
                f"{self.active[owner]} uploads of this owner in progress, at most {self.limit}"
            )
        self.active[owner] += 1
        try:
            yield
        finally:
            self.active[owner] -= 1
            if not self.active[owner]:
                del self.active[owner]
