"""The staged bytes of an upload, as the worker sees them: open them, and discard them.

``upload.bytes-received`` says where the gateway staged the bytes (its ``storage``):

* ``FileStorage(path)`` -- the filesystem store, ``<uploads dir>/<id>.bin``. The worker must see
  the same filesystem (embedded mode: one machine, one data dir).
* ``S3Storage(bucket, key, endpoint_url)`` -- the S3 store (scaled mode), key
  ``<prefix><id>``: read with ranged GETs (:class:`processing.sources_s3.S3ByteSource`).

Discarding keeps the store's tombstone, so ``GET /files/{id}`` answers 410 afterwards: it is
the store's own ``discard_bytes(id, "delivered")`` -- ``FileStore`` on the store directory, or
``S3Store`` on the bucket and prefix (tombstone in the upload's NATS KV record first, then the
objects), with the worker's NATS connection and S3 client (``s3:DeleteObject``,
``s3:ListBucket`` and ``s3:AbortMultipartUpload`` on the prefix).

:func:`delete_source` deletes a transfer's S3 source after its delivery (``delete_source``).
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
from gateway.store.kvrecords import KvRecords
from processing.errors import SourceUnavailable
from processing.sources import ByteSource, FileSource, SourceError

__all__ = [
    "DISCARD_REASON",
    "S3ClientFactory",
    "delete_source",
    "discard_staged",
    "open_source",
    "shared_file_store",
]

log = logging.getLogger("tusgate.processing")

#: Bytes per read (and per copy step of the local destination) of a staged file: few thread
#: hops per GiB. Memory is bounded by the larger of this and a Graph fragment.
READ_CHUNK = 16 * 1024 * 1024
#: The tombstone reason: GET /files/{id} answers 410 "upload is gone (delivered)".
DISCARD_REASON = "delivered"

#: The S3 client for an endpoint (None: the configured one), e.g. JobSources.s3_client.
S3ClientFactory = Callable[[str | None], Any]


async def open_source(storage: Storage, *, s3_client: S3ClientFactory | None = None) -> ByteSource:
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


async def discard_staged(
    storage: Storage,
    upload_id: str,
    *,
    s3_client: S3ClientFactory | None = None,
    records: KvRecords | None = None,
) -> bool:
    """Delete the staged bytes of a delivered upload, keeping the tombstone (410 afterwards).

    Returns False when there was nothing to discard here (already gone, another machine's file,
    a key that is not the upload's, or no S3 client); never raises for that. Raises
    StoreError when the store fails (the sweep tries again).
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
    if isinstance(storage, S3Storage):
        return await _discard_s3(storage, upload_id, s3_client, records)
    log.warning("cannot discard staged bytes of %s in %s", upload_id, type(storage).__name__)
    return False


async def _discard_s3(
    storage: S3Storage,
    upload_id: str,
    s3_client: S3ClientFactory | None,
    records: KvRecords | None,
) -> bool:
    if s3_client is None or records is None:
        log.warning("cannot discard staged bytes of %s: no S3 client or records", upload_id)
        return False
    if not upload_id or not storage.key.endswith(upload_id):
        log.warning("not discarding %s: %s is not its staged object", upload_id, storage.key)
        return False
    from gateway.store.s3store import S3Store  # boto3 only when it is used

    store = S3Store(
        s3_client(storage.endpoint_url),
        storage.bucket,
        records,
        prefix=storage.key[: -len(upload_id)],
        endpoint_url=storage.endpoint_url,
        threads=2,
    )
    try:
        await store.discard_bytes(upload_id, DISCARD_REASON)
    except UploadNotFound:
        return False
    finally:
        store.close()
    return True


async def delete_source(
    storage: S3Storage, etag: str, *, s3_client: S3ClientFactory | None
) -> bool:
    """Delete a transfer's S3 source, if it is still the version delivered (`etag`).

    False when there is nothing to delete (gone, replaced, no S3 client); SourceError when S3
    refuses (``retryable`` says whether trying later may help).
    """
    if s3_client is None:
        log.warning("cannot delete %s: no S3 client", storage.key)
        return False
    from processing.sources_s3 import delete_object  # boto3 only when it is used

    client = s3_client(storage.endpoint_url)
    return await delete_object(client, storage.bucket, storage.key, etag=etag)
