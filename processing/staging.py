"""The staged bytes of an upload, as the worker sees them: open them, and discard them.

``upload.bytes-received`` says where the gateway staged the bytes (its ``storage``):

* ``FileStorage(path)`` -- the filesystem store, ``<uploads dir>/<id>.bin``. The worker must see
  the same filesystem (embedded mode: one machine, one data dir).
* ``S3Storage(bucket, key)`` -- the S3 store (scaled mode): read with ranged GETs
  (:class:`processing.sources_s3.S3ByteSource`). Discarding is **not implemented yet**: this
  module is the seam -- :func:`discard_staged` should call the S3 store's
  ``discard_bytes(id, "delivered")`` (tombstone first, then the object).

Discarding keeps the store's tombstone, so ``GET /files/{id}`` answers 410 afterwards: for the
file store that is ``FileStore.discard_bytes(id, "delivered")`` on the store directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from events.model import FileStorage, S3Storage, Storage
from gateway.store.base import UploadNotFound
from gateway.store.filestore import FileStore
from processing.errors import SourceUnavailable
from processing.sources import ByteSource, FileSource, SourceError

__all__ = ["DISCARD_REASON", "discard_staged", "open_source", "shared_file_store"]

log = logging.getLogger("tusgate.processing")

#: Bytes per read (and per copy step of the local destination) of a staged file: few thread
#: hops per GiB. Memory is bounded by the larger of this and a Graph fragment.
READ_CHUNK = 16 * 1024 * 1024
#: The tombstone reason: GET /files/{id} answers 410 "upload is gone (delivered)".
DISCARD_REASON = "delivered"


async def open_source(
    storage: Storage, *, s3_client: Callable[[str | None], Any] | None = None
) -> ByteSource:
    """A ByteSource over the staged bytes. Raises SourceUnavailable.

    `s3_client(endpoint_url)` gives the S3 client for S3Storage (see processing.config).
    """
    if isinstance(storage, FileStorage):
        try:
            return await asyncio.to_thread(FileSource, storage.path, chunk_size=READ_CHUNK)
        except SourceError as exc:
            raise SourceUnavailable(exc.message, code=exc.code, retryable=exc.retryable) from exc
    if isinstance(storage, S3Storage):
        if s3_client is None:
            raise SourceUnavailable("no S3 client for S3 staging", code="source_unsupported")
        from processing.sources_s3 import S3ByteSource  # boto3 only when it is used

        client = s3_client(storage.endpoint_url)
        try:
            return await S3ByteSource.open(client, storage.bucket, storage.key)
        except SourceError as exc:
            raise SourceUnavailable(exc.message, code=exc.code, retryable=exc.retryable) from exc
    raise SourceUnavailable(f"unknown storage {storage!r}", code="source_unsupported")


def shared_file_store(directory: str | Path) -> FileStore:
    """The filesystem store in `directory`, opened beside the gateway that owns it (without
    `FileStore.recover`, which only the owning gateway runs at its start)."""
    return FileStore(Path(directory))


async def discard_staged(storage: Storage, upload_id: str) -> bool:
    """Delete the staged bytes of a delivered upload, keeping the tombstone (410 afterwards).

    Returns False when there was nothing to discard here (already gone, another machine's file,
    or a store this worker cannot reach); never raises for that.
    """
    if isinstance(storage, FileStorage):
        path = Path(storage.path)
        if path.name != f"{upload_id}.bin" or not path.parent.is_dir():
            log.warning("not discarding %s: %s is not its staged file here", upload_id, path)
            return False
        store = shared_file_store(path.parent)
        try:
            await store.discard_bytes(upload_id, DISCARD_REASON)
        except (UploadNotFound, FileNotFoundError):
            return False
        return True
    log.warning("cannot discard staged bytes of %s in %s yet", upload_id, type(storage).__name__)
    return False
