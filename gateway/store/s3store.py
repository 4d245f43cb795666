"""The S3 store: each upload is one S3 multipart upload, and a record in NATS KV says how far it got.

Where things live (upload ids are 32 lowercase hex digits, validated before any key is built, so
no id is a prefix of another and none leaves the prefix `<p>`):

    NATS KV `tusgate_uploads`, key `upload.<id>` (kvrecords.py) -- the record: UploadInfo as
                         JSON, offset included, plus a private "s3" member: the multipart upload
                         id, the part size chosen at creation, the ETags of the parts uploaded
                         so far (parts 1..n, each exactly the part size), the size of the tail,
                         and whether the multipart upload is completed. Every change to it is
                         revision-checked: shared by every gateway instance and worker.
    <p><id>              the multipart upload while bytes arrive; once complete, the whole file
                         (CompleteMultipartUpload), read by processing with ranged GETs.
    <p><id>.tail.<end>   the tail: bytes after the last part (fewer than a part) up to offset
                         <end>. Never rewritten: a longer tail is a new object, so the object a
                         record names is always exactly what the record says. The next request
                         prepends it to its bytes: it is folded into the next part.
    <p><id>.verify.<n>   a checksummed request's bytes that filled part <n> before the checksum
                         could be verified; copied into the upload (UploadPartCopy) once verified.

The record is the truth: offset = n x part size + tail (the size, once completed). A HEAD is one
KV read and no S3 request; a PATCH of one part is a KV read, an UploadPart and a KV update (plus
GET/PUT/DELETE of tails when the request starts or ends inside a part).

Why no acknowledged byte is lost, and none counted twice, by a crash (kill -9) at any moment:

* Whatever a new record points to is in S3 *before* the record is written; whatever the old
  record pointed to and the new one does not is deleted only *after*. A crash in between leaves
  garbage -- a part beyond the record (the next writer uploads that part number again, which
  replaces it), an object no record names (removed by the sweep) -- never a record that names
  something missing.
* Parts are uploaded in order, one at a time per upload (the next part is received meanwhile),
  and the record is updated as each one lands: a PATCH cut off by a crash keeps every part that
  reached S3. The request answers only after the record says where its last byte is.
* A checksummed request records nothing until `check()` is True: its full parts go to
  `.verify.<n>` objects first.
* If every byte is in parts but CompleteMultipartUpload did not happen (crash just before it),
  the next look at the upload completes it (idempotent).
* A writer that lost its lock (locks_kv.py) can record nothing: its revision is stale. Should it
  still overwrite a part in S3, CompleteMultipartUpload refuses the ETag the record does not
  hold, so a stale writer's bytes never become part of the file unnoticed.

Memory per request: the part being received plus the part being uploaded -- two part buffers,
under 2.25 x the part size with Python's bytearray growth slack, plus one body chunk (measured by
test_s3store.py). Per instance, the part buffers of all requests together stay within
`buffer_limit` (budget.py): a request waits for room before it starts filling a new buffer. The part size is 8 MiB by default, more only for uploads that may exceed
80,000 MiB (`s3parts.calc_part_size`; 26 MiB for 250 GiB); never the size of the upload. Buffers
live in memory, not in spooled temp files: a part is small, scaled gateways should not need a
local disk, and the bound is explicit. A concatenation reads at most 4 x 5 MiB at once (small
partials that cannot be copied server-side); GET streams 256 KiB chunks. A record holds one ETag
per part: at most 10,000, about 370 KB, under NATS's 1 MB message limit.

S3 cannot read parts of an unfinished multipart upload, so `read` serves a complete upload, or
ranges of an unfinished one that lie in its tail; anything else raises `UploadIncomplete`.

Every boto3 call runs in the store's thread pool, off the event loop. botocore errors are
translated here: NoSuchKey/NoSuchUpload/404 -> UploadNotFound; anything else -> StoreUnavailable.

Permissions needed on the bucket: s3:PutObject, s3:GetObject, s3:DeleteObject, s3:ListBucket,
s3:ListBucketMultipartUploads, s3:AbortMultipartUpload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from gateway.store.base import (
    ChunkCheck,
    ConcatError,
    InfoChange,
    OffsetConflict,
    StoreError,
    StoreUnavailable,
    UploadGone,
    UploadIncomplete,
    UploadInfo,
    UploadNotFound,
)
from gateway.store.budget import BudgetExhausted, ByteBudget
from gateway.store.kvrecords import KvRecords, RecordChanged
from gateway.store.s3parts import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    BufferPart,
    CopyPart,
    Part,
    PartSplitter,
    calc_part_size,
    plan_concat,
)

__all__ = ["S3API", "S3Store", "UploadIncomplete", "make_s3_client"]

log = logging.getLogger("tusgate.gateway")

ID_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")
KEY_PATTERN = re.compile(r"^([0-9a-f]{32})(\.tail\.\d+|\.verify\.\d+)?\Z")
READ_CHUNK = 256 * 1024
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "404", "NotFound"})
ORPHAN_GRACE = 3600.0  # seconds before objects/multipart uploads no record names are removed
CONCAT_CONCURRENCY = 4  # parts of a concatenation built at once (copies, or 5 MiB buffers)
DEFAULT_THREADS = 32
CHANGE_ATTEMPTS = 10  # a record changed by others this often in a row: give up (503)


class S3API(Protocol):
    """The S3 calls this store makes: a boto3 S3 client, or anything with these methods."""

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...
    def upload_part(self, **kwargs: Any) -> dict[str, Any]: ...
    def upload_part_copy(self, **kwargs: Any) -> dict[str, Any]: ...
    def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...
    def abort_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...
    def list_multipart_uploads(self, **kwargs: Any) -> dict[str, Any]: ...
    def put_object(self, **kwargs: Any) -> dict[str, Any]: ...
    def get_object(self, **kwargs: Any) -> dict[str, Any]: ...
    def head_object(self, **kwargs: Any) -> dict[str, Any]: ...
    def delete_object(self, **kwargs: Any) -> dict[str, Any]: ...
    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]: ...
    def head_bucket(self, **kwargs: Any) -> dict[str, Any]: ...


def make_s3_client(*, endpoint_url: str | None, region: str, max_connections: int = 64) -> S3API:
    """A boto3 S3 client; credentials come from the standard AWS chain (env, files, roles)."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        max_pool_connections=max_connections,
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=10,
        read_timeout=120,
        # Checksums only where S3 requires them: S3-compatible stores (MinIO, Ceph, moto)
        # differ in their support of the newer default trailing checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    client: S3API = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    return client


@dataclass(frozen=True)
class _Uploaded:
    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class _Record:
    """One upload's record in NATS KV, as read at `revision`."""

    info: UploadInfo  # offset included: the bytes the parts and the tail hold
    revision: int
    multipart_id: str | None
    part_size: int
    etags: tuple[str, ...] = ()  # parts 1..n; each is part_size bytes until completion
    tail: int = 0  # bytes of the tail object (0: none)
    completed: bool = False  # the object holds the whole file

    @property
    def parts_end(self) -> int:
        return self.info.offset - self.tail

    def to_json(self) -> dict[str, Any]:
        data = self.info.to_json()
        data["s3"] = {
            "multipart_id": self.multipart_id,
            "part_size": self.part_size,
            "etags": list(self.etags),
            "tail": self.tail,
            "completed": self.completed,
        }
        return data

    @classmethod
    def from_json(cls, raw: dict[str, Any], revision: int) -> _Record:
        private = raw.get("s3")
        s3 = private if isinstance(private, dict) else {}
        return cls(
            info=UploadInfo.from_json(raw),
            revision=revision,
            multipart_id=s3.get("multipart_id"),
            part_size=int(s3.get("part_size") or MIN_PART_SIZE),
            etags=tuple(s3.get("etags") or ()),
            tail=int(s3.get("tail") or 0),
            completed=bool(s3.get("completed")),
        )

    def advanced(self, new_etags: Sequence[str], *, offset: int, tail: int) -> _Record:
        """This record once more bytes landed: parts appended, a new tail, the clock moved."""
        return dataclasses.replace(
            self,
            etags=(*self.etags, *new_etags),
            tail=tail,
            info=self.info.replace(offset=offset, updated_at=time.time()),
        )


class S3Store:
    """DataStore + Terminater + Concater + LengthDeferrer + ContentReader + Lister, on S3 (bytes)
    and NATS KV (records)."""

    def __init__(
        self,
        api: S3API,
        bucket: str,
        records: KvRecords,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        max_size: int = 250 * 1024**3,
        part_size: int = DEFAULT_PART_SIZE,
        orphan_grace: float = ORPHAN_GRACE,
        threads: int = DEFAULT_THREADS,
        buffer_limit: int = 0,
        buffer_wait: float = 30.0,
    ) -> None:
        """`buffer_limit`: bytes of part buffers all writes of this store may hold at once
        (0: no limit; see budget.py); a write waits up to `buffer_wait` seconds for room."""
        self.api = api
        self.bucket = bucket
        self.records = records
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self.max_size = max_size
        self.preferred_part_size = part_size
        self.orphan_grace = orphan_grace
        self.budget = ByteBudget(buffer_limit, wait=buffer_wait) if buffer_limit else None
        calc_part_size(max_size, preferred=part_size)  # fail at start, not on the first upload
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3store")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def ping(self) -> None:
        """Raises StoreUnavailable unless the bucket answers (for /readyz)."""
        await self._call(self.api.head_bucket, Bucket=self.bucket)

    # -- the edge: every S3 call goes through here ----------------------------------------

    async def _call(self, method: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """Run one S3 call in the thread pool and translate its errors."""
        result: dict[str, Any] = await self._run(method, **kwargs)
        return result

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        try:
            return await _finish_first(future)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            name = getattr(fn, "__name__", "call")
            if code in NOT_FOUND_CODES:
                raise UploadNotFound(f"{name}: {code}") from exc
            log.warning("S3 %s failed: %s", name, exc)
            raise StoreUnavailable(f"S3 {name} failed: {code}") from exc
        except BotoCoreError as exc:
            log.warning("S3 unreachable: %s", exc)
            raise StoreUnavailable(f"S3 unreachable: {exc}") from exc

    async def _call_with_body(
        self, method: Callable[..., dict[str, Any]], body: bytes | bytearray, **kwargs: Any
    ) -> dict[str, Any]:
        """A call that sends a part-sized body. The body is handed over in a one-shot box: the
        thread pool's work item outlives the call by a moment, and must not keep the body alive
        then (or a third part buffer would exist while the next part is being received)."""
        box = [body]
        del body

        def call() -> dict[str, Any]:
            return method(Body=box.pop(), **kwargs)

        call.__name__ = getattr(method, "__name__", "call")
        return await self._call(call)

    async def _maybe(
        self, method: Callable[..., dict[str, Any]], **kwargs: Any
    ) -> dict[str, Any] | None:
        """The call's answer, or None when S3 says the key or upload does not exist."""
        try:
            return await self._call(method, **kwargs)
        except UploadNotFound:
            return None

    async def _abort(self, key: str, multipart_id: str | None) -> None:
        """AbortMultipartUpload, if there is one; already gone is fine."""
        if multipart_id:
            with contextlib.suppress(UploadNotFound):
                await self._call(
                    self.api.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=multipart_id,
                )

    async def _delete_quietly(self, keys: Sequence[str]) -> None:
        """Remove objects that are garbage either way; a failure only leaves them for the sweep."""
        for key in keys:
            with contextlib.suppress(StoreError):
                await self._call(self.api.delete_object, Bucket=self.bucket, Key=key)

    # -- keys -----------------------------------------------------------------------------

    def _key(self, upload_id: str, suffix: str = "") -> str:
        if not ID_PATTERN.match(upload_id):
            raise UploadNotFound(upload_id)
        return f"{self.prefix}{upload_id}{suffix}"

    def _tail_key(self, record: _Record) -> str:
        return self._key(record.info.id, f".tail.{record.info.offset}")

    def _named_by(self, record: _Record) -> set[str]:
        """The objects a live record needs."""
        named = {self._key(record.info.id)}
        if record.tail:
            named.add(self._tail_key(record))
        return named

    def _storage(self, upload_id: str) -> dict[str, str]:
        storage = {"kind": "s3", "bucket": self.bucket, "key": self._key(upload_id)}
        if self.endpoint_url:
            storage["endpoint_url"] = self.endpoint_url
        return storage

    # -- records --------------------------------------------------------------------------

    async def _get(self, upload_id: str) -> _Record:
        """The record as it is now, tombstones included."""
        self._key(upload_id)  # validates the id before NATS sees it
        raw, revision = await self.records.get(upload_id)
        return _Record.from_json(raw, revision)

    async def _save(self, record: _Record) -> _Record:
        """Write `record` over the revision it was read at; RecordChanged if anyone wrote since."""
        revision = await self.records.update(record.info.id, record.to_json(), record.revision)
        return dataclasses.replace(record, revision=revision)

    async def _change(
        self, upload_id: str, change: Callable[[_Record], _Record | None]
    ) -> tuple[_Record, _Record | None]:
        """Apply `change` to the current record (None: leave it as it is); when someone else
        wrote in between, read again and apply it to theirs. Returns (before, after)."""
        for _ in range(CHANGE_ATTEMPTS):
            record = await self._get(upload_id)
            changed = change(record)
            if changed is None:
                return record, None
            try:
                return record, await self._save(changed)
            except RecordChanged:
                continue
        raise StoreUnavailable(f"upload {upload_id} keeps changing; try again")

    async def _load(self, upload_id: str) -> _Record:
        """The live record; completes the upload if all its bytes are in but it is not."""
        for _ in range(CHANGE_ATTEMPTS):
            record = await self._get(upload_id)
            if record.info.gone:
                raise UploadGone(upload_id, record.info.gone, owner=record.info.owner)
            info = record.info
            if record.completed or not info.assembled or info.size != info.offset:
                return record
            try:
                return await self._complete(record)
            except RecordChanged:
                continue  # another instance completed it meanwhile: look again
        raise StoreUnavailable(f"upload {upload_id} keeps changing; try again")

    # -- parts and tails --------------------------------------------------------------------

    async def _fetch_tail(self, record: _Record) -> bytearray:
        """The tail's bytes, to be folded into the next part (at most a part: the bound)."""
        if not record.tail:
            return bytearray()
        resp = await self._call(self.api.get_object, Bucket=self.bucket, Key=self._tail_key(record))
        body = resp["Body"]
        try:
            data = bytearray(await self._run(body.read))
        finally:
            body.close()
        if len(data) != record.tail:
            raise StoreUnavailable(f"the tail of {record.info.id} does not match its record")
        return data

    async def _upload_part(self, record: _Record, number: int, body: bytes | bytearray) -> str:
        """UploadPart; returns its ETag."""
        if record.multipart_id is None:
            raise StoreUnavailable(f"{record.info.id} has no multipart upload")
        resp = await self._call_with_body(
            self.api.upload_part,
            body,
            Bucket=self.bucket,
            Key=self._key(record.info.id),
            UploadId=record.multipart_id,
            PartNumber=number,
        )
        return str(resp["ETag"])

    async def _complete(self, record: _Record) -> _Record:
        """Every byte is in: the tail becomes the last part, then CompleteMultipartUpload."""
        old_tail = self._tail_key(record) if record.tail else None
        if record.tail:
            data = await self._fetch_tail(record)
            etag = await self._upload_part(record, len(record.etags) + 1, data)
            record = await self._save(record.advanced([etag], offset=record.info.offset, tail=0))
        await self._finish_multipart(
            self._key(record.info.id), record.multipart_id, record.etags, record.info.offset
        )
        record = await self._save(dataclasses.replace(record, etags=(), completed=True))
        await self._delete_quietly([old_tail] if old_tail else [])
        return record

    async def _finish_multipart(
        self, key: str, multipart_id: str | None, etags: Sequence[str], size: int
    ) -> None:
        """CompleteMultipartUpload with parts 1..n; an empty file is a plain empty object."""
        if not etags:  # S3 wants at least one part
            await self._call(self.api.put_object, Bucket=self.bucket, Key=key, Body=b"")
            await self._abort(key, multipart_id)
            return
        if multipart_id is None:
            raise StoreUnavailable(f"{key} has parts but no multipart upload")
        try:
            await self._call(
                self.api.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=multipart_id,
                MultipartUpload={
                    "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
                },
            )
        except UploadNotFound:
            # Completed by an earlier attempt whose record update was lost: fine if whole.
            head = await self._call(self.api.head_object, Bucket=self.bucket, Key=key)
            if int(head["ContentLength"]) != size:
                raise
        log.debug("completed multipart upload %s (%d parts)", key, len(etags))

    # -- DataStore --------------------------------------------------------------------------

    async def create(self, info: UploadInfo) -> UploadInfo:
        key = self._key(info.id)
        part_size = calc_part_size(
            info.size if info.size is not None else self.max_size,
            preferred=self.preferred_part_size,
        )
        info = info.replace(offset=0, storage=self._storage(info.id))
        record = _Record(info=info, revision=0, multipart_id=None, part_size=part_size)
        # The bytes' home first, then the record: a record always has its bytes. A crash in
        # between leaves a multipart upload no record names, removed by the sweep.
        if info.size == 0 and info.assembled:
            await self._call(self.api.put_object, Bucket=self.bucket, Key=key, Body=b"")
            record = dataclasses.replace(record, completed=True)
        else:
            resp = await self._call(self.api.create_multipart_upload, Bucket=self.bucket, Key=key)
            record = dataclasses.replace(record, multipart_id=str(resp["UploadId"]))
        await self.records.create(info.id, record.to_json())
        return info

    async def get_info(self, upload_id: str) -> UploadInfo:
        return (await self._load(upload_id)).info

    async def update_info(self, upload_id: str, change: InfoChange) -> UploadInfo:
        def apply(record: _Record) -> _Record:
            if record.info.gone:
                raise UploadGone(upload_id, record.info.gone, owner=record.info.owner)
            keep = {"id": upload_id, "offset": record.info.offset, "storage": record.info.storage}
            return dataclasses.replace(record, info=change(record.info).replace(**keep))

        _, after = await self._change(upload_id, apply)
        assert after is not None
        return after.info

    async def write_chunk(
        self,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        check: ChunkCheck | None = None,
    ) -> int:
        record = await self._load(upload_id)
        if record.info.offset != offset:
            # The caller checked the offset under the upload's lock; a mismatch here means the
            # upload moved underneath, and appending would corrupt it.
            raise OffsetConflict(f"store offset is {record.info.offset}, not {offset}")
        if record.completed:
            async for chunk in chunks:
                if chunk:
                    raise OffsetConflict("the upload is complete")
            return 0
        writer = _Writer(self, record, verify_first=check is not None)
        try:
            return await self._write(writer, chunks, check)
        finally:
            writer.release_budget()

    async def _write(
        self, writer: _Writer, chunks: AsyncIterable[bytes], check: ChunkCheck | None
    ) -> int:
        try:
            async for chunk in chunks:
                try:
                    await writer.add(chunk)
                except (asyncio.CancelledError, BudgetExhausted):
                    raise  # cancelled, or no memory for more: nothing failed, keep what arrived
                except BaseException:
                    writer.broken = True  # S3 or NATS failed: what is recorded stays, add nothing
                    raise
        except BaseException:
            # The body broke off: client gone (aiohttp cancels the handler, or the read raises),
            # lock taken over, idle timeout. Keep what arrived -- unless S3 failed, or the chunk
            # is checksummed (all-or-nothing).
            if writer.broken or check is not None:
                await writer.abandon()
            else:
                await writer.commit()
            raise
        if check is not None and not check():
            await writer.abandon()
            return 0
        return await writer.commit()

    # -- capabilities -----------------------------------------------------------------------

    async def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        def apply(record: _Record) -> _Record:
            if record.info.gone:
                raise UploadGone(upload_id, record.info.gone, owner=record.info.owner)
            return dataclasses.replace(record, info=record.info.replace(size=length))

        await self._change(upload_id, apply)
        return (await self._load(upload_id)).info  # completes it if the bytes are all in

    def read(self, upload_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        self._key(upload_id)  # validates the id before anything else
        return self._read(upload_id, start, end)

    async def _read(self, upload_id: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        record = await self._load(upload_id)
        end = record.info.offset if end is None else min(end, record.info.offset)
        if start >= end:
            return
        key, base = self._key(upload_id), 0
        if not record.completed:
            if start < record.parts_end:
                raise UploadIncomplete(
                    f"bytes {start}-{end} of {upload_id} are not readable before completion"
                )
            key, base = self._tail_key(record), record.parts_end
        resp = await self._call(
            self.api.get_object,
            Bucket=self.bucket,
            Key=key,
            Range=f"bytes={start - base}-{end - base - 1}",
        )
        body = resp["Body"]
        chunks: Iterator[bytes] = body.iter_chunks(READ_CHUNK)
        try:
            while chunk := await self._run(next, chunks, b""):
                yield chunk
        finally:
            body.close()

    async def terminate(self, upload_id: str) -> None:
        for _ in range(CHANGE_ATTEMPTS):
            record = await self._get(upload_id)
            # The record goes first: from that moment the id is unknown. What follows only
            # frees space; a crash in between leaves objects no record names (the sweep's).
            try:
                await self.records.delete(upload_id, record.revision)
            except RecordChanged:
                continue
            await self._remove_bytes(upload_id, record.multipart_id)
            return
        raise StoreUnavailable(f"upload {upload_id} keeps changing; try again")

    async def discard_bytes(
        self,
        upload_id: str,
        reason: str,
        *,
        only_if: Callable[[UploadInfo], bool] | None = None,
    ) -> bool:
        def tombstone(record: _Record) -> _Record | None:
            if record.info.gone or (only_if is not None and not only_if(record.info)):
                return None
            return dataclasses.replace(
                record,
                info=record.info.replace(gone=reason, updated_at=time.time()),
                multipart_id=None,
                etags=(),
                tail=0,
                completed=False,
            )

        # Tombstone first (410 from now on), then the bytes; leftovers of a crash in between
        # are removed by the sweep, which sees a tombstone with objects beside it.
        before, after = await self._change(upload_id, tombstone)
        if after is None:
            return False
        await self._remove_bytes(upload_id, before.multipart_id)
        return True

    async def _remove_bytes(self, upload_id: str, multipart_id: str | None) -> None:
        key = self._key(upload_id)
        await self._abort(key, multipart_id)
        for k, _ in await self._list_objects(key):  # <p><id> and <p><id>.*: ids are fixed-size
            with contextlib.suppress(UploadNotFound):
                await self._call(self.api.delete_object, Bucket=self.bucket, Key=k)

    async def _list_objects(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last modified) of every object under `prefix`."""
        found: list[tuple[str, float]] = []
        token: dict[str, str] = {}
        while True:
            resp = await self._call(
                self.api.list_objects_v2, Bucket=self.bucket, Prefix=prefix, **token
            )
            found += [(o["Key"], o["LastModified"].timestamp()) for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return found
            token = {"ContinuationToken": resp["NextContinuationToken"]}

    async def _list_multipart(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:
            resp = await self._call(
                self.api.list_multipart_uploads, Bucket=self.bucket, Prefix=self.prefix, **markers
            )
            found += resp.get("Uploads", [])
            if not resp.get("IsTruncated"):
                return found
            markers = {
                "KeyMarker": resp["NextKeyMarker"],
                "UploadIdMarker": resp["NextUploadIdMarker"],
            }

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload's info, tombstones included (from the records: no S3 request per
        upload); then removes from S3 what no record needs."""
        records: dict[str, _Record] = {}
        for upload_id in await self.records.ids():
            if not ID_PATTERN.match(upload_id):
                continue
            try:
                record = await self._get(upload_id)
            except UploadNotFound:  # terminated
                continue
            records[upload_id] = record
            yield record.info
        await self._sweep_orphans(records)

    async def _sweep_orphans(self, records: dict[str, _Record]) -> None:
        """Abort multipart uploads and delete objects that no record (as read) needs.

        A tombstone's leftovers go at once. Anything else only after `orphan_grace`: the
        records were read before S3 was listed, so a newer upload, tail or part can be in the
        listing without its record -- but not for an hour."""
        old = time.time() - self.orphan_grace

        def removable(upload_id: str, modified: float) -> bool:
            record = records.get(upload_id)
            return bool(record is not None and record.info.gone) or modified < old

        for upload in await self._list_multipart():
            upload_id = upload["Key"][len(self.prefix) :]
            record = records.get(upload_id)
            if not ID_PATTERN.match(upload_id):
                continue
            if record is not None and record.multipart_id == upload["UploadId"]:
                continue
            if removable(upload_id, upload["Initiated"].timestamp()):
                log.info("aborting abandoned multipart upload of %s", upload_id)
                await self._abort(upload["Key"], upload["UploadId"])
        garbage = []
        for key, modified in await self._list_objects(self.prefix):
            match = KEY_PATTERN.match(key[len(self.prefix) :])
            if not match:
                continue
            record = records.get(match.group(1))
            if record is not None and not record.info.gone and key in self._named_by(record):
                continue
            if removable(match.group(1), modified):
                garbage.append(key)
        await self._delete_quietly(garbage)

    async def concat(self, final: UploadInfo, partials: list[UploadInfo]) -> None:
        """Assemble `final` inside S3: UploadPartCopy of each partial's object, no bytes through
        the gateway -- except partials under the 5 MiB part minimum that are not the end of the
        final upload: those are read into 5 MiB buffered parts (`s3parts.plan_concat`)."""
        key = self._key(final.id)
        sizes = [p.size or 0 for p in partials]
        total = sum(sizes)
        record = await self._get(final.id)
        if record.completed:
            return
        whole = await self._maybe(self.api.head_object, Bucket=self.bucket, Key=key)
        if whole is None or int(whole["ContentLength"]) != total:
            # (else: assembled by an earlier attempt that did not get to record it)
            await self._assemble(key, record.multipart_id, partials, sizes)

        def assembled(record: _Record) -> _Record:
            info = record.info.replace(
                size=total, offset=total, assembled=True, updated_at=time.time()
            )
            return dataclasses.replace(record, info=info, etags=(), tail=0, completed=True)

        await self._change(final.id, assembled)

    async def _assemble(
        self, key: str, multipart_id: str | None, partials: list[UploadInfo], sizes: list[int]
    ) -> None:
        try:
            plan = plan_concat(sizes)
        except ValueError as exc:
            raise ConcatError(str(exc)) from exc
        limit = asyncio.Semaphore(CONCAT_CONCURRENCY)
        sources = [self._key(p.id) for p in partials]

        async def build(part: CopyPart | BufferPart) -> _Uploaded:
            async with limit:
                return await self._concat_part(key, multipart_id, part, sources, sizes)

        parts = await asyncio.gather(*(build(p) for p in plan))
        etags = [p.etag for p in sorted(parts, key=lambda p: p.number)]
        await self._finish_multipart(key, multipart_id, etags, sum(sizes))
        head = await self._call(self.api.head_object, Bucket=self.bucket, Key=key)
        if int(head["ContentLength"]) != sum(sizes):
            raise ConcatError("assembled size does not match the partials")

    async def _concat_part(
        self,
        key: str,
        multipart_id: str | None,
        part: CopyPart | BufferPart,
        sources: list[str],
        sizes: list[int],
    ) -> _Uploaded:
        if multipart_id is None:
            raise ConcatError("the final upload has no multipart upload")
        target = {
            "Bucket": self.bucket,
            "Key": key,
            "UploadId": multipart_id,
            "PartNumber": part.number,
        }
        if isinstance(part, CopyPart):
            extra = {}
            if (part.start, part.end) != (0, sizes[part.source]):
                extra["CopySourceRange"] = f"bytes={part.start}-{part.end - 1}"
            resp = await self._call(
                self.api.upload_part_copy,
                CopySource={"Bucket": self.bucket, "Key": sources[part.source]},
                **target,
                **extra,
            )
            return _Uploaded(part.number, part.size, str(resp["CopyPartResult"]["ETag"]))
        buffer = bytearray()
        for source, start, end in part.pieces:
            resp = await self._call(
                self.api.get_object,
                Bucket=self.bucket,
                Key=sources[source],
                Range=f"bytes={start}-{end - 1}",
            )
            body = resp["Body"]
            try:
                buffer += await self._run(body.read)
            finally:
                body.close()
        size = len(buffer)
        resp = await self._call_with_body(self.api.upload_part, buffer, **target)
        return _Uploaded(part.number, size, str(resp["ETag"]))




class _Writer:
    """The bytes of one write_chunk call on their way into parts.

    Every byte taken in (`received`) is, at any await, in exactly one place: a recorded part,
    the part in flight, a full part waiting (`full`) or the buffer. So a write that is cancelled
    or broken off at any await can still `commit` all of it. At most two part-sized buffers exist: the one
    being uploaded and the one being received (or waiting). The next part is uploaded only after
    the previous one landed and was recorded, so recorded parts always form a prefix of the
    upload. With `verify_first`, full parts go to `.verify.<n>` objects until `commit` copies
    them in, and nothing is recorded before.
    """

    def __init__(self, store: S3Store, record: _Record, *, verify_first: bool) -> None:
        self.store = store
        self.record = record  # the latest record: every update moves it on
        self.verify_first = verify_first
        self.splitter = PartSplitter(
            part_size=record.part_size,
            parts_end=record.parts_end,
            next_number=len(record.etags) + 1,
            tail=record.tail,
            size=record.info.size,
        )
        # The tail object this write started from: deleted once a record no longer names it.
        self.old_tail = store._tail_key(record) if record.tail else None
        self.buffer: bytearray | None = None  # None until the first byte; starts with the tail
        self.full: list[tuple[Part, bytearray]] = []  # cut, waiting for the part in flight
        self.staged: list[tuple[int, str]] = []  # (part number, .verify key) awaiting check
        self.inflight: asyncio.Future[None] | None = None
        self.received = 0
        self.broken = False  # an S3 or NATS call of this write failed: commit nothing more
        # Part buffers of the store's budget (budget.py) held by this write: the buffer being
        # filled (once paid for) and the full parts waiting; a part being uploaded holds its
        # own until it landed.
        self.budget_held = 0
        self.buffer_paid = False

    async def add(self, chunk: bytes) -> None:
        """Take the chunk in. A byte counts as received once it is in a buffer: a write
        cancelled while it waits for budget room keeps (and commits) only those."""
        view = memoryview(chunk)
        while view:
            if not self.buffer_paid:
                # Waits holding no buffer it is filling (the last one is on its way to S3), so
                # writes waiting for each other cannot all wait forever.
                await self._take_budget()
            if self.buffer is None:
                self.buffer = await self.store._fetch_tail(self.record)
            take = min(len(view), self.splitter.room())
            self.buffer += view[:take]
            view = view[take:]
            self.received += take
            for part in self.splitter.feed(take):  # at most one: take <= room
                self.full.append((part, self.buffer))  # with the buffer's share of the budget
                self.buffer = bytearray()
                self.buffer_paid = False
            await self._send_full()

    async def _send_full(self) -> None:
        """Start uploading the waiting parts, each once the one before it has landed."""
        while self.full:
            await self._settle()  # the await that holds the body back: back-pressure
            part, body = self.full.pop(0)
            self.inflight = asyncio.ensure_future(self._send(part, body))
            del body

    async def _send(self, part: Part, body: bytearray) -> None:
        store = self.store
        self._hand_over_budget()
        try:
            if self.verify_first:
                key = store._key(self.record.info.id, f".verify.{part.number}")
                await store._call_with_body(
                    store.api.put_object, body, Bucket=store.bucket, Key=key
                )
                self.staged.append((part.number, key))
            else:
                etag = await store._upload_part(self.record, part.number, body)
                await self._record([etag], offset=part.end, tail=0)
        finally:
            self._give_budget(1)  # the part's buffer is S3's now (or lost with the failure)

    async def _take_budget(self) -> None:
        if self.store.budget is not None:
            await self.store.budget.take(self.record.part_size)
            self.budget_held += 1
        self.buffer_paid = True

    def _hand_over_budget(self) -> None:
        """A full part leaves this write's hands for its upload, with its share of the budget."""
        if self.store.budget is not None:
            self.budget_held -= 1

    def _give_budget(self, buffers: int) -> None:
        if self.store.budget is not None and buffers:
            self.store.budget.give(buffers * self.record.part_size)

    def release_budget(self) -> None:
        """The write is over: its buffers are garbage (a part still uploading gives its own)."""
        self._give_budget(self.budget_held)
        self.budget_held = 0

    async def _settle(self) -> None:
        if self.inflight is not None:
            await asyncio.shield(self.inflight)  # a cancelled write still learns how it ended
            self.inflight = None

    async def _record(self, etags: Sequence[str], *, offset: int, tail: int) -> None:
        """Make the record say that these parts landed and the tail ends at `offset`; then the
        tail this write started from is garbage."""
        self.record = await self.store._save(self.record.advanced(etags, offset=offset, tail=tail))
        if self.old_tail is not None:
            await self.store._delete_quietly([self.old_tail])
            self.old_tail = None

    async def commit(self) -> int:
        """Make what arrived part of the upload; returns how many new bytes were kept."""
        await self._send_full()
        await self._settle()
        if self.received == 0:
            return 0
        assert self.buffer is not None
        store, record = self.store, self.record
        etags: list[str] = []
        for number, key in self.staged:  # verified: copy in, in order
            resp = await store._call(
                store.api.upload_part_copy,
                Bucket=store.bucket,
                Key=store._key(record.info.id),
                UploadId=record.multipart_id,
                PartNumber=number,
                CopySource={"Bucket": store.bucket, "Key": key},
            )
            etags.append(str(resp["CopyPartResult"]["ETag"]))
        plan = self.splitter.finish()
        landed = (len(record.etags) + len(etags)) * record.part_size
        if landed != plan.tail[0] - sum(p.size for p in plan.parts):
            # Never record a tail (or complete) beyond what is in S3; cannot happen unless a
            # part upload failed, and then that error was raised before we got here.
            raise StoreUnavailable(f"parts end at {landed}, not {plan.tail[0]}")
        start, end = plan.tail
        if plan.complete:
            for part in plan.parts:
                etags.append(await store._upload_part(record, part.number, self.buffer))
            await self._record(etags, offset=end, tail=0)  # every byte in parts: then complete
            self.record = await store._complete(self.record)
        else:
            if end > start:
                key = store._key(record.info.id, f".tail.{end}")
                await store._call_with_body(
                    store.api.put_object, self.buffer, Bucket=store.bucket, Key=key
                )
            await self._record(etags, offset=end, tail=end - start)
        await store._delete_quietly([key for _, key in self.staged])
        return self.received

    async def abandon(self) -> None:
        """The chunk failed its check or broke off, or S3 failed: add nothing more."""
        with contextlib.suppress(Exception):
            await self._settle()
        await self.store._delete_quietly([key for _, key in self.staged])


async def _finish_first(future: asyncio.Future[Any]) -> Any:
    """The result of an S3 call running in a thread. A call cannot be stopped once sent, so a
    cancellation waits for it to end before it is raised: whoever acts next (a resumed PATCH,
    possibly on another instance) never races a request of ours still in flight."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller gets
        raise asyncio.CancelledError
    return future.result()
