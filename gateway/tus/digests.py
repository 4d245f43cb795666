"""Whole-upload checksums computed while the bytes arrive, so completion needs no re-read.

A running hash is kept per upload between its PATCH requests (in this process). When it is
missing -- the gateway restarted, another instance took an earlier PATCH, the upload was built by
concatenation -- completion hashes the stored bytes instead: slower, never wrong.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from gateway.store.base import StoreComposer, UploadInfo

__all__ = ["WHOLE_UPLOAD_ALGORITHM", "RunningDigests"]

WHOLE_UPLOAD_ALGORITHM = "sha256"
MAX_KEPT = 4096  # running hashes kept between requests; a sha256 object is ~200 bytes


class RunningDigests:
    def __init__(self) -> None:
        self._kept: OrderedDict[str, tuple[int, Any]] = OrderedDict()

    def take(self, upload_id: str, offset: int) -> Any:
        """The running hash of bytes [0, offset), or a fresh one at offset 0, or None."""
        kept = self._kept.pop(upload_id, None)
        if kept is not None and kept[0] == offset:
            return kept[1]
        return hashlib.new(WHOLE_UPLOAD_ALGORITHM) if offset == 0 else None

    def keep(self, upload_id: str, offset: int, hasher: Any) -> None:
        if hasher is None:
            return
        self._kept[upload_id] = (offset, hasher)
        while len(self._kept) > MAX_KEPT:
            self._kept.popitem(last=False)

    def forget(self, upload_id: str) -> None:
        self._kept.pop(upload_id, None)

    async def finish(self, store: StoreComposer, info: UploadInfo, hasher: Any) -> dict[str, str]:
        """The checksums of a complete upload, hashing the stored bytes if no running hash."""
        self.forget(info.id)
        if hasher is None:
            if store.reader is None:
                return {}
            hasher = hashlib.new(WHOLE_UPLOAD_ALGORITHM)
            async for chunk in store.reader.read(info.id, 0, info.size):
                hasher.update(chunk)
        return {WHOLE_UPLOAD_ALGORITHM: hasher.hexdigest()}
