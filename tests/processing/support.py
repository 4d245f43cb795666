"""Helpers shared by the delivery-layer tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from processing.destinations import FRAGMENT_UNIT
from processing.sources import ByteSource, FileSource, SourceError

__all__ = ["TEST_FRAGMENT", "FailingSource", "SourceFile"]

#: Small fragments: many fragments per test file, quickly.
TEST_FRAGMENT = FRAGMENT_UNIT


@dataclass(frozen=True)
class SourceFile:
    """A source file written by the ``make_source`` fixture, with its sha256."""

    source: FileSource
    path: Path
    sha256: str

    @property
    def size(self) -> int:
        return self.source.size


class FailingSource:
    """A source whose reads fail (a store going away) for ranges reaching past ``fail_at``;
    with `code`/`retryable` another failure (``source_changed``, not retryable, ...)."""

    def __init__(
        self,
        inner: ByteSource,
        fail_at: int,
        *,
        code: str = "source_failed",
        retryable: bool = True,
    ) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.code = code
        self.retryable = retryable

    @property
    def size(self) -> int:
        return self.inner.size

    async def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        if end > self.fail_at:
            raise SourceError("store unreachable", retryable=self.retryable, code=self.code)
        async for chunk in self.inner.open_range(start, end):
            yield chunk
