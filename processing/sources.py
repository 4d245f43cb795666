"""Where the bytes of a delivery come from.

A destination reads the bytes it delivers through a :class:`ByteSource`: a known size and
ranged, streaming reads. Ranged reads matter because a resumed Graph upload session restarts
in the middle of a file, and a retried fragment is read again instead of being kept in memory.

Implementations here: :class:`FileSource` (a local file, e.g. the filesystem store). S3 and
store-backed sources implement the same protocol elsewhere.

Errors: a source raises :class:`SourceError` (never a bare ``OSError``); ``retryable`` says
whether reading again later may succeed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ByteSource",
    "FileSource",
    "SourceError",
    "check_range",
    "open_range",
    "read_range",
]

#: Bytes per chunk yielded by :meth:`FileSource.open_range` (1 MiB): large enough that the
#: thread hop per read is cheap, small enough to bound memory per reader.
DEFAULT_CHUNK_SIZE = 1024 * 1024


class SourceError(Exception):
    """The source could not deliver the bytes it promised.

    ``code`` is the stable machine-readable reason (``processing.aborted``'s ``code``), e.g.
    ``source_not_found``, ``source_changed``, ``too_large``, ``address_not_allowed``,
    ``source_http_404``; ``source_failed`` when nothing more specific is known.
    """

    def __init__(self, message: str, *, retryable: bool, code: str = "source_failed") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"retryable={self.retryable})"
        )


@runtime_checkable
class ByteSource(Protocol):
    """Immutable bytes of a known size, read in ranges."""

    @property
    def size(self) -> int:
        """Total number of bytes."""
        ...

    def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` in order, in bounded chunks (never empty ones).

        Raises :class:`SourceError` when the bytes cannot be read or end early, and
        ``ValueError`` for a range outside ``0 <= start <= end <= size``.
        """
        ...


def check_range(start: int, end: int, size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= start <= end <= size``."""
    if not 0 <= start <= end <= size:
        raise ValueError(f"range [{start}, {end}) outside [0, {size}]")


@asynccontextmanager
async def open_range(
    source: ByteSource, start: int, end: int
) -> AsyncIterator[AsyncIterator[bytes]]:
    """``source.open_range`` that is closed on exit, even when the reader stops early.

    An abandoned async generator would otherwise keep its file handle (or HTTP response) open
    until the garbage collector finalizes it.
    """
    chunks = source.open_range(start, end)
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def read_range(source: ByteSource, start: int, end: int) -> bytes:
    """Read ``[start, end)`` of ``source`` into memory (for one bounded fragment only)."""
    async with open_range(source, start, end) as chunks:
        parts = [chunk async for chunk in chunks]
    data = b"".join(parts)
    if len(data) != end - start:
        raise SourceError(
            f"source yielded {len(data)} bytes for range [{start}, {end})", retryable=False
        )
    return data


class FileSource:
    """A local file as a :class:`ByteSource`.

    The size is taken when the source is created; the file must not change afterwards (the
    store hands over finished uploads only). Reads run in a worker thread, one chunk at a
    time, so a slow disk never blocks the event loop.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.path = Path(path)
        self.chunk_size = chunk_size
        try:
            self._size = self.path.stat().st_size
        except FileNotFoundError as exc:
            raise SourceError(f"source file {self.path.name!r} not found", retryable=False) from exc
        except OSError as exc:
            raise SourceError(f"cannot stat source file: {exc.strerror}", retryable=True) from exc

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, size={self._size})"

    async def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        check_range(start, end, self._size)
        if start == end:
            return
        try:
            handle = await asyncio.to_thread(open, self.path, "rb")
        except FileNotFoundError as exc:
            raise SourceError(f"source file {self.path.name!r} vanished", retryable=False) from exc
        except OSError as exc:
            raise SourceError(f"cannot open source file: {exc.strerror}", retryable=True) from exc
        try:
            position = start
            while position < end:
                want = min(self.chunk_size, end - position)
                try:
                    chunk = await asyncio.to_thread(os.pread, handle.fileno(), want, position)
                except OSError as exc:
                    raise SourceError(
                        f"cannot read source file: {exc.strerror}", retryable=True
                    ) from exc
                if not chunk:
                    raise SourceError(
                        f"source file ended at byte {position}, expected {end}", retryable=False
                    )
                position += len(chunk)
                yield chunk
        finally:
            handle.close()
