"""The S3 store: each upload is one S3 multipart upload, plus a few small objects beside it.

Layout in the bucket, under the configured prefix (`<p>`; upload ids are 32 lowercase hex digits,
validated before any key is built, so no id is a prefix of another and none leaves the prefix):

    <p><id>.info         UploadInfo as JSON (without the offset), replaced by one PUT -- atomic per
                         object. Its private "s3" member holds the multipart upload id and the part
                         size chosen at creation.
    <p><id>              the multipart upload while bytes arrive; once complete, the whole file
                         (CompleteMultipartUpload), read by processing with ranged GETs.
    <p><id>.part         the tail: bytes after the last uploaded part, fewer than a part. Its
                         metadata `tusgate-start` is the offset it begins at. The next request
                         prepends it to its bytes, so it is folded into the next part.
    <p><id>.verify.<n>   a checksummed request's bytes that filled part <n> before the checksum
                         could be verified; copied into the upload (UploadPartCopy) once verified.

The offset is what S3 holds: the sum of the uploaded parts (ListParts) plus the tail, when the
tail's `tusgate-start` equals that sum. A tail whose start is below it was already folded into a
part (a crash came between that UploadPart and the tail's replacement) and counts nothing.

Why no acknowledged byte is lost by a crash (kill -9) at any moment:

* Every part but the last is exactly the upload's part size and covers bytes
  [(n-1) x size, n x size). Parts are uploaded strictly in order, one at a time per upload (the
  next part is received meanwhile), so ListParts never shows a gap: the parts are always a prefix
  of the upload.
* A part that folds the tail in is uploaded *before* the tail is replaced; the tail is replaced
  with one PUT (or left stale and ignored). At every moment the offset above counts bytes that are
  in S3, each exactly once. The request answers only after that state is written.
* A checksummed request writes nothing the offset counts until `check()` is True: its full parts go
  to `.verify.<n>` objects first. A crash during the copy-in keeps a prefix of verified bytes.
* If every byte is in parts but CompleteMultipartUpload did not happen (crash just before it), the
  next look at the upload completes it (idempotent).

Memory per request: the part being received plus the part being uploaded -- two part buffers,
under 2.25 x the part size with Python's bytearray growth slack, plus one body chunk (measured by
test_s3store.py). The part size is 8 MiB by default, more only for uploads that may exceed
80,000 MiB (`s3parts.calc_part_size`; 26 MiB for 250 GiB); never the size of the upload. Buffers live in memory, not in spooled temp files: a part is small, scaled
gateways should not need a local disk, and the bound is explicit. A concatenation reads at most
4 x 5 MiB at once (small partials that cannot be copied server-side); GET streams 256 KiB chunks.

S3 cannot read parts of an unfinished multipart upload, so `read` serves a complete upload, or
ranges of an unfinished one that lie in its tail; anything else raises `UploadIncomplete`.

Every boto3 call runs in the store's thread pool, off the event loop. botocore errors are
translated here: NoSuchKey/NoSuchUpload/404 -> UploadNotFound; anything else -> StoreUnavailable.

Permissions needed on the bucket: s3:PutObject, s3:GetObject, s3:DeleteObject, s3:ListBucket,
s3:ListBucketMultipartUploads, s3:ListMultipartUploadParts, s3:AbortMultipartUpload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from gateway.store.base import (
    ChunkCheck,
    ConcatError,
    OffsetConflict,
    StoreError,
    StoreUnavailable,
    UploadGone,
    UploadIncomplete,
    UploadInfo,
    UploadNotFound,
)
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

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
KEY_PATTERN = re.compile(r"^([0-9a-f]{32})(\.info|\.part|\.verify\.\d+)?$")
READ_CHUNK = 256 * 1024
START_META = "tusgate-start"
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "404", "NotFound"})
ORPHAN_GRACE = 3600.0  # seconds before objects/multipart uploads without info are removed
CONCAT_CONCURRENCY = 4  # parts of a concatenation built at once (copies, or 5 MiB buffers)
DEFAULT_THREADS = 32


class S3API(Protocol):
    """The S3 calls this store makes: a boto3 S3 client, or anything with these methods."""

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...
    def upload_part(self, **kwargs: Any) -> dict[str, Any]: ...
    def upload_part_copy(self, **kwargs: Any) -> dict[str, Any]: ...
    def list_parts(self, **kwargs: Any) -> dict[str, Any]: ...
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
class _State:
    """One upload as found in S3."""

    info: UploadInfo  # offset and updated_at filled in
    multipart_id: str | None
    part_size: int
    parts: tuple[_Uploaded, ...]  # parts 1..n, a prefix of the upload
    tail: int  # bytes of the valid tail (0: none)
    tail_exists: bool  # a tail object exists, valid or stale
    completed: bool  # the object holds the whole file

    @property
    def parts_end(self) -> int:
        return sum(p.size for p in self.parts)


def _private(raw: dict[str, Any]) -> dict[str, Any]:
    value = raw.get("s3")
    return value if isinstance(value, dict) else {}


class S3Store:
    """DataStore + Terminater + Concater + LengthDeferrer + ContentReader + Lister, on S3."""

    def __init__(
        self,
        api: S3API,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        max_size: int = 250 * 1024**3,
        part_size: int = DEFAULT_PART_SIZE,
        orphan_grace: float = ORPHAN_GRACE,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.api = api
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self.max_size = max_size
        self.preferred_part_size = part_size
        self.orphan_grace = orphan_grace
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

    async def _delete_quietly(self, keys: list[str]) -> None:
        """Remove objects that are garbage either way; a failure only leaves them for later."""
        for key in keys:
            with contextlib.suppress(StoreError):
                await self._call(self.api.delete_object, Bucket=self.bucket, Key=key)

    # -- keys and info --------------------------------------------------------------------

    def _key(self, upload_id: str, suffix: str = "") -> str:
        if not ID_PATTERN.match(upload_id):
            raise UploadNotFound(upload_id)
        return f"{self.prefix}{upload_id}{suffix}"

    def _storage(self, upload_id: str) -> dict[str, str]:
        storage = {"kind": "s3", "bucket": self.bucket, "key": self._key(upload_id)}
        if self.endpoint_url:
            storage["endpoint_url"] = self.endpoint_url
        return storage

    async def _read_raw(self, upload_id: str) -> dict[str, Any]:
        resp = await self._call(
            self.api.get_object, Bucket=self.bucket, Key=self._key(upload_id, ".info")
        )
        body = await self._run(resp["Body"].read)
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise StoreUnavailable(f"info of {upload_id} is unreadable") from exc
        if not isinstance(raw, dict):
            raise StoreUnavailable(f"info of {upload_id} is unreadable")
        return raw

    async def _write_raw(self, info: UploadInfo, private: dict[str, Any]) -> None:
        data = info.to_json()
        data.pop("offset", None)  # the offset is what S3 holds, never stored twice
        data["s3"] = private
        await self._call(
            self.api.put_object,
            Bucket=self.bucket,
            Key=self._key(info.id, ".info"),
            Body=json.dumps(data).encode(),
            ContentType="application/json",
        )

    # -- state ------------------------------------------------------------------------------

    async def _list_parts(self, key: str, multipart_id: str) -> list[dict[str, Any]] | None:
        parts: list[dict[str, Any]] = []
        marker = 0
        while True:
            resp = await self._maybe(
                self.api.list_parts,
                Bucket=self.bucket,
                Key=key,
                UploadId=multipart_id,
                PartNumberMarker=marker,
            )
            if resp is None:
                return None
            parts += resp.get("Parts", [])
            if not resp.get("IsTruncated"):
                return parts
            marker = int(resp["NextPartNumberMarker"])

    async def _load(self, upload_id: str, raw: dict[str, Any] | None = None) -> _State:
        """The upload as S3 holds it; completes it if all its bytes are in but it is not."""
        key = self._key(upload_id)
        raw = raw if raw is not None else await self._read_raw(upload_id)
        info = UploadInfo.from_json(raw)
        if info.gone:
            raise UploadGone(upload_id, info.gone)
        multipart_id = _private(raw).get("multipart_id")
        part_size = int(_private(raw).get("part_size") or MIN_PART_SIZE)
        listed, tail, whole = await asyncio.gather(
            self._list_parts(key, multipart_id) if multipart_id else _none(),
            self._maybe(self.api.head_object, Bucket=self.bucket, Key=key + ".part"),
            self._maybe(self.api.head_object, Bucket=self.bucket, Key=key),
        )
        parts: tuple[_Uploaded, ...] = ()
        tail_size = 0
        modified = [info.updated_at]
        if whole is not None:  # complete: the object is the whole file
            offset = int(whole["ContentLength"])
            modified.append(whole["LastModified"].timestamp())
        elif listed is None:
            raise UploadNotFound(upload_id)  # no bytes anywhere: terminated, or lost
        else:
            # A final upload being assembled has copy parts of any size, in any order (a crashed
            # concat leaves some): none of them counts until CompleteMultipartUpload.
            parts = _prefix(listed, part_size) if info.assembled else ()
            offset = sum(p.size for p in parts)
            modified += [p["LastModified"].timestamp() for p in listed[: len(parts)]]
            if tail is not None and int(tail.get("Metadata", {}).get(START_META, -1)) == offset:
                tail_size = int(tail["ContentLength"])  # else: stale, folded into a part
                offset += tail_size
                modified.append(tail["LastModified"].timestamp())
        info = info.replace(
            offset=offset, updated_at=max(modified), storage=self._storage(upload_id)
        )
        state = _State(
            info, multipart_id, part_size, parts, tail_size, tail is not None, whole is not None
        )
        if not state.completed and info.size == offset and info.assembled:
            await self._complete(state, tail_bytes=await self._fetch_tail(state))
            state = dataclasses.replace(state, parts=(), tail=0, tail_exists=False, completed=True)
        return state

    async def _fetch_tail(self, state: _State) -> bytearray:
        """The tail's bytes, to be folded into the next part (at most a part: the bound)."""
        if not state.tail:
            return bytearray()
        resp = await self._call(
            self.api.get_object, Bucket=self.bucket, Key=self._key(state.info.id, ".part")
        )
        body = resp["Body"]
        try:
            start = int(resp.get("Metadata", {}).get(START_META, -1))
            if start != state.parts_end or int(resp["ContentLength"]) != state.tail:
                raise OffsetConflict("the tail changed underneath")  # another writer: never mix
            data = bytearray(await self._run(body.read))
        finally:
            body.close()
        if len(data) != state.tail:
            raise StoreUnavailable("the tail was cut short")
        return data

    async def _complete(self, state: _State, *, tail_bytes: bytes | bytearray) -> None:
        """CompleteMultipartUpload with the parts 1..n (plus the tail as the last part)."""
        key = self._key(state.info.id)
        parts = list(state.parts)
        if tail_bytes:
            parts.append(await self._upload_part(state, len(parts) + 1, tail_bytes))
        await self._finish_multipart(key, state.multipart_id, parts)
        await self._delete_quietly([key + ".part"] if state.tail_exists or tail_bytes else [])

    async def _finish_multipart(
        self, key: str, multipart_id: str | None, parts: list[_Uploaded]
    ) -> None:
        if not parts:  # S3 wants at least one part; an empty file is a plain empty object
            await self._call(self.api.put_object, Bucket=self.bucket, Key=key, Body=b"")
            if multipart_id:
                with contextlib.suppress(UploadNotFound):
                    await self._call(
                        self.api.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=multipart_id,
                    )
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
                    "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
                },
            )
        except UploadNotFound:
            # Completed meanwhile (a concurrent look repaired it): fine if the object is whole.
            head = await self._call(self.api.head_object, Bucket=self.bucket, Key=key)
            if int(head["ContentLength"]) != sum(p.size for p in parts):
                raise
        log.debug("completed multipart upload %s (%d parts)", key, len(parts))

    async def _upload_part(self, state: _State, number: int, body: bytes | bytearray) -> _Uploaded:
        assert state.multipart_id is not None
        size = len(body)
        resp = await self._call_with_body(
            self.api.upload_part,
            body,
            Bucket=self.bucket,
            Key=self._key(state.info.id),
            UploadId=state.multipart_id,
            PartNumber=number,
        )
        return _Uploaded(number, size, str(resp["ETag"]))

    # -- DataStore --------------------------------------------------------------------------

    async def create(self, info: UploadInfo) -> UploadInfo:
        key = self._key(info.id)
        part_size = calc_part_size(
            info.size if info.size is not None else self.max_size,
            preferred=self.preferred_part_size,
        )
        info = info.replace(offset=0, storage=self._storage(info.id))
        multipart_id: str | None = None
        # The bytes' home first, then the info: an info always has its bytes, so it is never
        # unreadable. A crash in between leaves an upload without info, removed by the sweep.
        if info.size == 0 and info.assembled:
            await self._call(self.api.put_object, Bucket=self.bucket, Key=key, Body=b"")
        else:
            resp = await self._call(self.api.create_multipart_upload, Bucket=self.bucket, Key=key)
            multipart_id = str(resp["UploadId"])
        await self._write_raw(info, {"multipart_id": multipart_id, "part_size": part_size})
        return info

    async def get_info(self, upload_id: str) -> UploadInfo:
        return (await self._load(upload_id)).info

    async def save_info(self, info: UploadInfo) -> None:
        raw = await self._read_raw(info.id)  # keeps the private member (multipart id, part size)
        await self._write_raw(info, _private(raw))

    async def write_chunk(
        self,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        check: ChunkCheck | None = None,
    ) -> int:
        state = await self._load(upload_id)
        if state.info.offset != offset:
            # The caller checked the offset under the upload's lock; a mismatch here means the
            # upload moved underneath, and appending would corrupt it.
            raise OffsetConflict(f"store offset is {state.info.offset}, not {offset}")
        if state.completed:
            async for chunk in chunks:
                if chunk:
                    raise OffsetConflict("the upload is complete")
            return 0
        writer = _Writer(self, state, verify_first=check is not None)
        try:
            async for chunk in chunks:
                try:
                    await writer.add(chunk)
                except asyncio.CancelledError:
                    raise  # cancelled while waiting for S3: nothing failed
                except BaseException:
                    writer.broken = True  # S3 failed: what landed is consistent, add nothing
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
        raw = await self._read_raw(upload_id)
        info = UploadInfo.from_json(raw)
        if info.gone:
            raise UploadGone(upload_id, info.gone)
        await self._write_raw(info.replace(size=length), _private(raw))
        return (await self._load(upload_id)).info  # completes it if the bytes are all in

    def read(self, upload_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        self._key(upload_id)  # validates the id before anything else
        return self._read(upload_id, start, end)

    async def _read(self, upload_id: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        state = await self._load(upload_id)
        end = state.info.offset if end is None else min(end, state.info.offset)
        if start >= end:
            return
        key, base = self._key(upload_id), 0
        if not state.completed:
            if start < state.parts_end:
                raise UploadIncomplete(
                    f"bytes {start}-{end} of {upload_id} are not readable before completion"
                )
            key, base = key + ".part", state.parts_end
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
        raw = await self._read_raw(upload_id)
        # The info goes first: from that moment the id is unknown. What follows only frees
        # space; a crash in between leaves objects without info, which the sweep removes.
        await self._call(
            self.api.delete_object, Bucket=self.bucket, Key=self._key(upload_id, ".info")
        )
        await self._remove_bytes(upload_id, _private(raw).get("multipart_id"))

    async def discard_bytes(self, upload_id: str, reason: str) -> None:
        raw = await self._read_raw(upload_id)
        info = UploadInfo.from_json(raw)
        # Tombstone first (answers 410 from now on), then the bytes; leftovers of a crash in
        # between are removed by the sweep, which sees a tombstone with bytes beside it.
        await self._write_raw(
            info.replace(gone=reason, updated_at=time.time()),
            {**_private(raw), "multipart_id": None},
        )
        await self._remove_bytes(upload_id, _private(raw).get("multipart_id"))

    async def _remove_bytes(self, upload_id: str, multipart_id: str | None) -> None:
        key = self._key(upload_id)
        if multipart_id:
            with contextlib.suppress(UploadNotFound):
                await self._call(
                    self.api.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=multipart_id,
                )
        keys = [k for k, _ in await self._list_objects(key) if k != key + ".info"]
        for k in keys:
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
        """Every upload's info, tombstones included; then removes what belongs to no upload."""
        # Multipart uploads are listed before the objects: one created after this moment is
        # never judged against an object listing that predates its info.
        multipart = await self._list_multipart()
        objects: dict[str, list[tuple[str, float]]] = {}
        for key, modified in await self._list_objects(self.prefix):
            match = KEY_PATTERN.match(key[len(self.prefix) :])
            if match:
                objects.setdefault(match.group(1), []).append((key, modified))
        live: dict[str, str | None] = {}  # id -> its current multipart upload id
        for upload_id in sorted(objects):
            if not any(k.endswith(".info") for k, _ in objects[upload_id]):
                continue
            try:
                raw = await self._read_raw(upload_id)
                info = UploadInfo.from_json(raw)
                if info.gone:
                    yield info
                    continue
                live[upload_id] = _private(raw).get("multipart_id")
                try:
                    yield (await self._load(upload_id, raw)).info
                except UploadNotFound:  # its bytes vanished (e.g. a bucket lifecycle rule):
                    del live[upload_id]  # let it expire into a tombstone like any other
                    yield info.replace(storage=self._storage(upload_id))
            except (UploadNotFound, UploadGone):
                continue
        await self._sweep_orphans(multipart, objects, live)

    async def _sweep_orphans(
        self,
        multipart: list[dict[str, Any]],
        objects: dict[str, list[tuple[str, float]]],
        live: dict[str, str | None],
    ) -> None:
        """Abort multipart uploads and delete objects that no live info points to.

        A tombstone's bytes go at once; bytes without any info only after `orphan_grace`
        (creation writes the multipart upload just before the info)."""
        old = time.time() - self.orphan_grace
        for upload in multipart:
            upload_id = upload["Key"][len(self.prefix) :]
            if not ID_PATTERN.match(upload_id) or live.get(upload_id) == upload["UploadId"]:
                continue
            has_info = any(k.endswith(".info") for k, _ in objects.get(upload_id, []))
            if has_info or upload["Initiated"].timestamp() < old:
                log.info("aborting abandoned multipart upload of %s", upload_id)
                with contextlib.suppress(UploadNotFound):
                    await self._call(
                        self.api.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
        for upload_id, keys in objects.items():
            if upload_id in live:
                continue
            if any(k.endswith(".info") for k, _ in keys):  # a tombstone: only the info stays
                await self._delete_quietly([k for k, _ in keys if not k.endswith(".info")])
            else:
                await self._delete_quietly([k for k, modified in keys if modified < old])

    async def concat(self, final: UploadInfo, partials: list[UploadInfo]) -> None:
        """Assemble `final` inside S3: UploadPartCopy of each partial's object, no bytes through
        the gateway -- except partials under the 5 MiB part minimum that are not the end of the
        final upload: those are read into 5 MiB buffered parts (`s3parts.plan_concat`)."""
        key = self._key(final.id)
        sizes = [p.size or 0 for p in partials]
        whole = await self._maybe(self.api.head_object, Bucket=self.bucket, Key=key)
        if whole is not None and int(whole["ContentLength"]) == sum(sizes):
            return  # assembled by an earlier attempt that did not get to save the info
        raw = await self._read_raw(final.id)
        multipart_id = _private(raw).get("multipart_id")
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
        await self._finish_multipart(key, multipart_id, list(parts))
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

    Every byte handed to `add` is, at any await, in exactly one place: an uploaded part, the part
    in flight, a full part waiting (`full`) or the buffer. So a write that is cancelled or broken
    off at any await can still `commit` all of it. At most two part-sized buffers exist: the one
    being uploaded and the one being received (or waiting). The next part is uploaded only after
    the previous one landed, so parts always form a prefix of the upload.
    With `verify_first`, full parts go to `.verify.<n>` objects until `commit` copies them in.
    """

    def __init__(self, store: S3Store, state: _State, *, verify_first: bool) -> None:
        self.store = store
        self.state = state
        self.verify_first = verify_first
        self.splitter = PartSplitter(
            part_size=state.part_size,
            parts_end=state.parts_end,
            next_number=len(state.parts) + 1,
            tail=state.tail,
            size=state.info.size,
        )
        self.buffer: bytearray | None = None  # None until the first byte; starts with the tail
        self.full: list[tuple[Part, bytearray]] = []  # cut, waiting for the part in flight
        self.parts: list[_Uploaded] = list(state.parts)
        self.staged: list[tuple[int, str, int]] = []  # (part number, key, size) awaiting check
        self.inflight: asyncio.Future[None] | None = None
        self.received = 0
        self.broken = False  # an S3 call of this write failed: commit nothing more

    async def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.buffer is None:
            self.buffer = await self.store._fetch_tail(self.state)
        view = memoryview(chunk)
        while view:  # no await in here: the chunk is accounted for as a whole
            take = min(len(view), self.splitter.room())
            self.buffer += view[:take]
            view = view[take:]
            self.received += take
            for part in self.splitter.feed(take):
                self.full.append((part, self.buffer))
                self.buffer = bytearray()
        await self._send_full()

    async def _send_full(self) -> None:
        """Start uploading the waiting parts, each once the one before it has landed."""
        while self.full:
            await self._settle()  # the await that holds the body back: back-pressure
            part, body = self.full.pop(0)
            self.inflight = asyncio.ensure_future(self._send(part, body))
            del body

    async def _send(self, part: Part, body: bytearray) -> None:
        if self.verify_first:
            key = self.store._key(self.state.info.id, f".verify.{part.number}")
            await self.store._call_with_body(
                self.store.api.put_object, body, Bucket=self.store.bucket, Key=key
            )
            self.staged.append((part.number, key, part.size))
        else:
            self.parts.append(await self.store._upload_part(self.state, part.number, body))

    async def _settle(self) -> None:
        if self.inflight is not None:
            await asyncio.shield(self.inflight)  # a cancelled write still learns how it ended
            self.inflight = None

    async def commit(self) -> int:
        """Make what arrived part of the upload; returns how many new bytes were kept."""
        await self._send_full()
        await self._settle()
        if self.received == 0:
            return 0
        assert self.buffer is not None
        store, state = self.store, self.state
        for number, key, size in self.staged:  # verified: copy in, in order
            resp = await store._call(
                store.api.upload_part_copy,
                Bucket=store.bucket,
                Key=store._key(state.info.id),
                UploadId=state.multipart_id,
                PartNumber=number,
                CopySource={"Bucket": store.bucket, "Key": key},
            )
            self.parts.append(_Uploaded(number, size, str(resp["CopyPartResult"]["ETag"])))
        plan = self.splitter.finish()
        landed = sum(p.size for p in self.parts)
        if landed != plan.tail[0] - sum(p.size for p in plan.parts):
            # Never record a tail (or complete) beyond what is in S3; cannot happen unless a
            # part upload failed, and then that error was raised before we got here.
            raise StoreUnavailable(f"parts end at {landed}, not {plan.tail[0]}")
        tail_key = store._key(state.info.id, ".part")
        folded = len(self.parts) > len(state.parts) or state.tail == 0
        if plan.complete:
            for part in plan.parts:
                self.parts.append(await store._upload_part(state, part.number, self.buffer))
            await store._finish_multipart(store._key(state.info.id), state.multipart_id, self.parts)
            await store._delete_quietly([tail_key] if state.tail_exists else [])
        elif plan.tail[1] > plan.tail[0]:
            await store._call_with_body(
                store.api.put_object,
                self.buffer,
                Bucket=store.bucket,
                Key=tail_key,
                Metadata={START_META: str(plan.tail[0])},
            )
        elif state.tail_exists and folded:
            await store._delete_quietly([tail_key])  # folded into a part: stale, counts nothing
        await store._delete_quietly([key for _, key, _ in self.staged])
        return self.received

    async def abandon(self) -> None:
        """The chunk failed its check or broke off, or S3 failed: add nothing more."""
        with contextlib.suppress(Exception):
            await self._settle()
        await self.store._delete_quietly([key for _, key, _ in self.staged])


def _prefix(listed: list[dict[str, Any]], part_size: int) -> tuple[_Uploaded, ...]:
    """Parts 1..n as listed; parts are uploaded in order, so there is no gap to stop at."""
    parts: list[_Uploaded] = []
    for raw in sorted(listed, key=lambda p: int(p["PartNumber"])):
        if int(raw["PartNumber"]) != len(parts) + 1:
            break
        if parts and parts[-1].size != part_size:
            raise StoreUnavailable("a short part is followed by another: the upload is damaged")
        parts.append(_Uploaded(int(raw["PartNumber"]), int(raw["Size"]), str(raw["ETag"])))
    return tuple(parts)


async def _none() -> None:
    return None


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
