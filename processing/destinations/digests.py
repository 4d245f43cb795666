"""Hashes of the bytes a destination sends, and the checks made with them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any

from processing.sources import ByteSource, open_range

from .errors import ChecksumMismatch
from .quickxor import QuickXorHash

__all__ = ["Digests"]


class Digests:
    """sha256 + QuickXorHash of a source, fed in order, exactly once per byte.

    Fragments may be sent more than once (retries) and a resumed session may start past bytes
    this process never read; :meth:`catch_up` reads such a gap from the source without sending
    it, so the digests always describe the source's bytes ``[0, upto)``.
    """

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.quickxor = QuickXorHash()
        self.upto = 0

    @property
    def complete(self) -> bool:
        return self.upto == self.source.size

    async def catch_up(self, offset: int) -> None:
        """Hash the source up to ``offset`` (reading what was not fed)."""
        if offset > self.upto:
            async with open_range(self.source, self.upto, offset) as chunks:
                async for chunk in chunks:
                    await asyncio.to_thread(self._update, chunk)

    def feed(self, start: int, data: bytes) -> None:
        """Hash the part of ``data`` (the bytes at ``start``) not hashed yet."""
        end = start + len(data)
        if start <= self.upto < end:
            self._update(data[self.upto - start :] if self.upto > start else data)

    async def feed_async(self, start: int, data: bytes) -> None:
        """:meth:`feed` in a worker thread: hashing a 10 MiB fragment takes tens of ms.

        Callers must not feed or catch up concurrently (the upload loop awaits each call).
        """
        await asyncio.to_thread(self.feed, start, data)

    def _update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.quickxor.update(chunk)
        self.upto += len(chunk)

    def check_declared(self, expected: str | None) -> None:
        """Refuse (not retryable) when the source differs from the sha256 declared upstream."""
        actual = self.sha256.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumMismatch(f"sha256 of the source is {actual}, expected {expected}")

    def matches(self, item: Mapping[str, Any]) -> bool:
        """Does the driveItem hold exactly these bytes (size and a hash Graph reports)?"""
        if not self.complete or item.get("size") != self.upto:
            return False
        sha256, quickxor = _hashes(item)
        if sha256 is not None:
            return sha256.lower() == self.sha256.hexdigest()
        return quickxor is not None and quickxor == self.quickxor.b64digest()

    def verify(self, item: Mapping[str, Any]) -> None:
        """Compare the driveItem Graph returned after the upload with what we sent.

        OneDrive Personal reports ``sha256Hash``, OneDrive for Business and SharePoint only
        ``quickXorHash``: whichever is present is checked. A difference is retryable.
        """
        if item.get("size") not in (None, self.upto):
            raise ChecksumMismatch(
                f"OneDrive stored {item.get('size')} bytes, sent {self.upto}", retryable=True
            )
        sha256, quickxor = _hashes(item)
        if sha256 is not None and sha256.lower() != self.sha256.hexdigest():
            raise ChecksumMismatch(
                "OneDrive's sha256Hash differs from the bytes sent", retryable=True
            )
        if quickxor is not None and quickxor != self.quickxor.b64digest():
            raise ChecksumMismatch(
                "OneDrive's quickXorHash differs from the bytes sent", retryable=True
            )


def _hashes(item: Mapping[str, Any]) -> tuple[str | None, str | None]:
    file_facet = item.get("file")
    hashes = file_facet.get("hashes") if isinstance(file_facet, Mapping) else None
    if not isinstance(hashes, Mapping):
        return None, None
    sha256, quickxor = hashes.get("sha256Hash"), hashes.get("quickXorHash")
    return (
        sha256 if isinstance(sha256, str) and sha256 else None,
        quickxor if isinstance(quickxor, str) and quickxor else None,
    )
