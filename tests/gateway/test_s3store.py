"""S3 store specifics, on a real moto S3 server and a real nats-server for the records (the
contract suite covers the common ground).

A crash is emulated by an injected S3 client (or records) that "dies" at a chosen call: that call
and every later one fail, so S3 and NATS are left exactly as a `kill -9` at that moment would
leave them. A fresh store then looks at the upload.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from gateway.store.base import (
    OffsetConflict,
    StoreComposer,
    StoreUnavailable,
    UploadGone,
    UploadInfo,
    UploadNotFound,
)
from gateway.store.kvrecords import KvRecords, RecordChanged
from gateway.store.s3parts import MIN_PART_SIZE
from gateway.store.s3store import S3API, S3Store, UploadIncomplete, make_s3_client

MiB = 1024 * 1024
PART = MIN_PART_SIZE
PREFIX = "up/"


class SimulatedCrash(Exception):
    pass


class RecordingAPI:
    """The real client, with every call recorded; `crash_when(name, kwargs)` kills it."""

    def __init__(
        self, real: S3API, crash_when: Callable[[str, dict[str, Any]], bool] | None = None
    ) -> None:
        self.real = real
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.crash_when = crash_when
        self.crashed = False
        self.on_call: Callable[[str, dict[str, Any]], None] | None = None

    def __getattr__(self, name: str) -> Callable[..., dict[str, Any]]:
        method = getattr(self.real, name)

        def call(**kwargs: Any) -> dict[str, Any]:
            if self.crashed or (self.crash_when is not None and self.crash_when(name, kwargs)):
                self.crashed = True
                raise SimulatedCrash(name)
            # Bodies are recorded by length: holding them would defeat the memory test.
            self.calls.append((name, {**kwargs, "Body": len(kwargs.get("Body", b""))}))
            if self.on_call is not None:
                self.on_call(name, kwargs)
            result: dict[str, Any] = method(**kwargs)
            return result

        return call

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def client(s3_server: str) -> Iterator[Any]:
    c = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    yield c
    c.close()


class DyingRecords:
    """The real records; `crash_when(op, nth)` kills them at the nth call of an operation."""

    def __init__(self, real: KvRecords, op: str, nth: int = 1) -> None:
        self.real, self.op, self.nth = real, op, nth
        self.crashed = False

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.real, name)

        async def call(*args: Any) -> Any:
            if name == self.op:
                self.nth -= 1
                self.crashed = self.crashed or self.nth == 0
            if self.crashed:
                raise SimulatedCrash(name)
            return await method(*args)

        return call


@pytest.fixture
def make_store(
    s3_server: str, s3_bucket: str, upload_records: KvRecords
) -> Iterator[Callable[..., S3Store]]:
    stores: list[S3Store] = []

    def factory(api: S3API | None = None, records: Any = None, **kw: Any) -> S3Store:
        kw.setdefault("part_size", PART)
        store = S3Store(
            api or make_s3_client(endpoint_url=s3_server, region="us-east-1"),
            s3_bucket,
            records or upload_records,
            prefix=PREFIX,
            endpoint_url=s3_server,
            **kw,
        )
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


def new_info(size: int | None, **kw: Any) -> UploadInfo:
    return UploadInfo(id=os.urandom(16).hex(), size=size, **kw)


async def stream(data: bytes, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


async def broken(data: bytes) -> AsyncIterator[bytes]:
    async for piece in stream(data):
        yield piece
    raise ConnectionResetError("client went away")


async def read_all(store: S3Store, upload_id: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in store.read(upload_id, start, end)])


def keys(client: Any, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def multipart_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def parts_of(client: Any, bucket: str, upload_id: str) -> list[int]:
    [upload] = [u for u in multipart_uploads(client, bucket) if u["Key"] == PREFIX + upload_id]
    listed = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return [p["Size"] for p in listed.get("Parts", [])]


def tails(client: Any, bucket: str, upload_id: str) -> dict[str, int]:
    """Tail objects of an upload: key suffix -> size."""
    found = {}
    for key in keys(client, bucket):
        if key.startswith(f"{PREFIX}{upload_id}.tail."):
            found[key.split(".", 1)[1]] = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    return found


async def record_of(records: KvRecords, upload_id: str) -> dict[str, Any]:
    raw, _ = await records.get(upload_id)
    private: dict[str, Any] = raw["s3"]
    return private


async def test_many_small_patches_across_part_boundaries(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store()
    data = os.urandom(2 * PART + 123_457)
    info = await store.create(new_info(len(data)))
    step = 700_001  # never lines up with a part
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        assert await store.write_chunk(info.id, start, stream(piece, 100_000)) == len(piece)
        offset = (await store.get_info(info.id)).offset
        assert offset == start + len(piece)
        if offset < len(data):  # parts of exactly one part size, the rest in one tail object
            assert parts_of(client, s3_bucket, info.id) == [PART] * (offset // PART)
            tail = offset % PART
            assert tails(client, s3_bucket, info.id) == ({f"tail.{offset}": tail} if tail else {})
    assert (await store.get_info(info.id)).is_complete
    assert await read_all(store, info.id) == data
    # Complete: the object is the whole file, nothing else is left.
    assert keys(client, s3_bucket) == {PREFIX + info.id}
    assert multipart_uploads(client, s3_bucket) == []
    storage = (await store.get_info(info.id)).storage
    assert storage["kind"] == "s3" and storage["key"] == PREFIX + info.id
    assert storage["bucket"] == s3_bucket and storage["endpoint_url"]


async def test_check_failure_after_a_part_boundary_keeps_nothing(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store()
    data = os.urandom(3 * PART)
    info = await store.create(new_info(len(data)))
    head = 3 * MiB
    await store.write_chunk(info.id, 0, stream(data[:head]))
    chunk = data[head : head + 2 * PART]  # crosses two part boundaries
    assert await store.write_chunk(info.id, head, stream(chunk), check=lambda: False) == 0
    assert (await store.get_info(info.id)).offset == head
    assert parts_of(client, s3_bucket, info.id) == []
    assert tails(client, s3_bucket, info.id) == {f"tail.{head}": head}
    assert not any(".verify." in k for k in keys(client, s3_bucket))
    with pytest.raises(ConnectionResetError):  # broken off: all-or-nothing too
        await store.write_chunk(info.id, head, broken(chunk), check=lambda: True)
    assert (await store.get_info(info.id)).offset == head
    assert not any(".verify." in k for k in keys(client, s3_bucket))
    assert await store.write_chunk(info.id, head, stream(chunk), check=lambda: True) == len(chunk)
    assert (await store.get_info(info.id)).offset == head + len(chunk)
    assert parts_of(client, s3_bucket, info.id) == [PART, PART]
    assert not any(".verify." in k for k in keys(client, s3_bucket))
    rest = data[head + len(chunk) :]
    await store.write_chunk(info.id, head + len(chunk), stream(rest), check=lambda: True)
    assert await read_all(store, info.id) == data


async def test_check_is_called_after_the_whole_body(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    info = await store.create(new_info(10))
    seen: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        seen.append(1)
        yield b"de"
        seen.append(2)

    def check() -> bool:
        assert seen == [1, 2]
        return True

    assert await store.write_chunk(info.id, 0, body(), check=check) == 5


async def test_concat_copies_server_side_and_buffers_small_partials(
    make_store: Callable[..., S3Store], s3_server: str, client: Any, s3_bucket: str
) -> None:
    api = RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"))
    store = make_store(api)
    sizes = [1000, 11 * MiB, PART + 1, 100, 2 * MiB + 7]
    parts = [os.urandom(n) for n in sizes]
    infos = []
    for part in parts:
        info = await store.create(new_info(len(part), is_partial=True))
        await store.write_chunk(info.id, 0, stream(part))
        infos.append(await store.get_info(info.id))
    final = await store.create(
        new_info(None, partial_uploads=tuple(i.id for i in infos), assembled=False)
    )
    api.calls.clear()
    await store.concat(final, infos)
    await store.update_info(final.id, lambda i: i.replace(size=sum(sizes), assembled=True))
    assert (await store.get_info(final.id)).is_complete
    assert await read_all(store, final.id) == b"".join(parts)
    by_number = sorted(api.calls, key=lambda call: int(call[1].get("PartNumber", 0)))
    copies = [kw for name, kw in by_number if name == "upload_part_copy"]  # built concurrently
    uploads = [kw for name, kw in by_number if name == "upload_part"]
    # 1000 B borrow the first 5 MiB - 1000 B of the 11 MiB partial; its rest is copied inside
    # S3 (a ranged copy), the 5 MiB + 1 partial whole; the last two (100 B + 2 MiB, the end of
    # the final upload) are one small buffered part. Memory: at most 5 MiB per buffered part.
    assert [kw.get("CopySourceRange") for kw in copies] == [
        f"bytes={PART - 1000}-{11 * MiB - 1}",
        None,
    ]
    assert [kw["Body"] for kw in uploads] == [PART, 100 + 2 * MiB + 7]
    assert [i.offset for i in [await store.get_info(i.id) for i in infos]] == sizes  # untouched
    # Doing it again (a retry after a crash before the info was saved) changes nothing.
    await store.concat(final, infos)
    assert await read_all(store, final.id) == b"".join(parts)
    assert multipart_uploads(client, s3_bucket) == []


async def test_concat_retried_after_a_crash(
    make_store: Callable[..., S3Store], s3_server: str
) -> None:
    store = make_store()
    parts = [os.urandom(PART + 1), os.urandom(10), os.urandom(PART + 2), os.urandom(PART + 3)]
    infos = []
    for part in parts:
        info = await store.create(new_info(len(part), is_partial=True))
        await store.write_chunk(info.id, 0, stream(part))
        infos.append(await store.get_info(info.id))
    final = await store.create(
        new_info(None, partial_uploads=tuple(i.id for i in infos), assembled=False)
    )
    dying = make_store(
        RecordingAPI(
            make_s3_client(endpoint_url=s3_server, region="us-east-1"),
            crash_at("complete_multipart_upload"),
        )
    )
    with pytest.raises(SimulatedCrash):  # all parts copied, never completed
        await dying.concat(final, infos)
    got = await store.get_info(final.id)  # copy parts of any size do not count, nor break it
    assert (got.offset, got.assembled) == (0, False)
    await store.concat(final, infos)
    await store.update_info(final.id, lambda i: i.replace(size=sum(map(len, parts)), assembled=True))
    assert await read_all(store, final.id) == b"".join(parts)


async def test_concat_of_empty_partials(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    infos = [await store.create(new_info(0, is_partial=True)) for _ in range(2)]
    final = await store.create(
        new_info(None, partial_uploads=tuple(i.id for i in infos), assembled=False)
    )
    await store.concat(final, [await store.get_info(i.id) for i in infos])
    await store.update_info(final.id, lambda i: i.replace(size=0, assembled=True))
    assert (await store.get_info(final.id)).is_complete
    assert await read_all(store, final.id) == b""


async def test_terminate_removes_every_object_and_aborts_the_upload(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store()
    other = await store.create(new_info(10))
    info = await store.create(new_info(3 * PART))
    await store.write_chunk(info.id, 0, stream(os.urandom(PART + 1000)))
    # A staged chunk left behind by a crash is removed too.
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}{info.id}.verify.2", Body=b"x")
    assert len(keys(client, s3_bucket)) == 2 and len(multipart_uploads(client, s3_bucket)) == 2
    await store.terminate(info.id)
    assert keys(client, s3_bucket) == set()
    assert [u["Key"] for u in multipart_uploads(client, s3_bucket)] == [PREFIX + other.id]
    with pytest.raises(UploadNotFound):
        await store.get_info(info.id)
    with pytest.raises(UploadNotFound):
        await store.terminate(info.id)


async def test_discard_bytes_keeps_only_the_tombstone(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store()
    info = await store.create(new_info(3 * PART))
    await store.write_chunk(info.id, 0, stream(os.urandom(PART + 10)))
    done = await store.create(new_info(5))
    await store.write_chunk(done.id, 0, stream(b"hello"))
    await store.discard_bytes(info.id, "expired")
    await store.discard_bytes(done.id, "delivered")
    assert keys(client, s3_bucket) == set()
    assert multipart_uploads(client, s3_bucket) == []
    with pytest.raises(UploadGone) as gone:
        await store.get_info(done.id)
    assert gone.value.reason == "delivered"


async def test_read_ranges_across_parts(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    data = os.urandom(2 * PART + 4321)
    info = await store.create(new_info(len(data)))
    await store.write_chunk(info.id, 0, stream(data, 1_000_000))
    for start, end in [
        (PART - 10, PART + 10),
        (0, len(data)),
        (2 * PART - 1, 2 * PART + 1),
        (len(data) - 1, len(data)),
        (123, 2 * PART + 7),
        (PART, 2 * PART),
    ]:
        assert await read_all(store, info.id, start, end) == data[start:end]
    assert await read_all(store, info.id, 7) == data[7:]
    assert await read_all(store, info.id, 10, 10) == b""
    assert await read_all(store, info.id, 0, len(data) + 100) == data


async def test_unfinished_uploads_read_only_from_their_tail(
    make_store: Callable[..., S3Store],
) -> None:
    store = make_store()
    data = os.urandom(PART + 1000)
    info = await store.create(new_info(3 * PART))
    await store.write_chunk(info.id, 0, stream(data))
    assert await read_all(store, info.id, PART + 10) == data[PART + 10 :]
    with pytest.raises(UploadIncomplete):
        await read_all(store, info.id, 0, 10)  # in a part: S3 cannot read it before completion


async def test_deferred_length_completes_on_declaration(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store()
    data = os.urandom(PART + 77)
    info = await store.create(new_info(None))
    await store.write_chunk(info.id, 0, stream(data[:100]))
    await store.write_chunk(info.id, 100, stream(data[100:]))
    assert not (await store.get_info(info.id)).is_complete
    declared = await store.declare_length(info.id, len(data))
    assert declared.is_complete and declared.size == len(data)
    assert await read_all(store, info.id) == data
    assert multipart_uploads(client, s3_bucket) == []
    empty = await store.create(new_info(None))
    assert (await store.declare_length(empty.id, 0)).is_complete
    assert await read_all(store, empty.id) == b""


async def test_zero_length_upload_is_an_object_at_once(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    info = await store.create(new_info(0))
    assert (await store.get_info(info.id)).is_complete
    assert await read_all(store, info.id) == b""


async def test_offset_conflict_and_complete_upload(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    info = await store.create(new_info(3))
    await store.write_chunk(info.id, 0, stream(b"abc"))
    with pytest.raises(OffsetConflict):
        await store.write_chunk(info.id, 2, stream(b"x"))
    assert await store.write_chunk(info.id, 3, stream(b"")) == 0


async def test_part_size_grows_with_the_upload(
    make_store: Callable[..., S3Store], upload_records: KvRecords
) -> None:
    store = make_store(part_size=PART, max_size=250 * 1024**3)
    big = await store.create(new_info(100 * 1024**3))  # 100 GiB needs parts over 10 MiB
    deferred = await store.create(new_info(None))  # may reach Tus-Max-Size: 26 MiB parts
    small = await store.create(new_info(10))
    sizes = {}
    for info in (big, deferred, small):
        sizes[info.id] = (await record_of(upload_records, info.id))["part_size"]
    assert sizes == {big.id: 11 * MiB, deferred.id: 26 * MiB, small.id: PART}


# -- crashes ---------------------------------------------------------------------------------


def crash_at(
    name: str, *, key_suffix: str | None = None, nth: int = 1
) -> Callable[[str, dict[str, Any]], bool]:
    seen = 0

    def when(call: str, kwargs: dict[str, Any]) -> bool:
        nonlocal seen
        if call != name or (
            key_suffix is not None and not str(kwargs.get("Key", "")).endswith(key_suffix)
        ):
            return False
        seen += 1
        return seen == nth

    return when


@pytest.mark.parametrize(
    ("when", "expected_offset"),
    [
        (crash_at("upload_part"), 3 * MiB),  # the part with the tail folded in never landed
        (crash_at("upload_part", nth=2), PART),  # second part of the write never landed
        (crash_at("put_object", key_suffix=".tail.15728633"), 2 * PART),  # parts in, no new tail
    ],
    ids=["before-part", "between-parts", "before-tail"],
)
async def test_crash_during_a_write_loses_no_stored_byte(
    make_store: Callable[..., S3Store],
    s3_server: str,
    when: Callable[[str, dict[str, Any]], bool],
    expected_offset: int,
) -> None:
    data = os.urandom(3 * PART + 5)
    writer = make_store()
    info = await writer.create(new_info(len(data)))
    await writer.write_chunk(info.id, 0, stream(data[: 3 * MiB]))  # a 3 MiB tail
    dying = make_store(
        RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"), when)
    )
    with pytest.raises(SimulatedCrash):
        await dying.write_chunk(info.id, 3 * MiB, stream(data[3 * MiB : 3 * PART - 7]))
    # A new instance sees an upload whose offset counts each stored byte once ...
    fresh = make_store()
    offset = (await fresh.get_info(info.id)).offset
    assert offset == expected_offset
    # ... and resuming from there gives exactly the right file.
    await fresh.write_chunk(info.id, offset, stream(data[offset:]))
    assert hashlib.sha256(await read_all(fresh, info.id)).digest() == hashlib.sha256(data).digest()


async def test_crash_during_a_checksummed_write(
    make_store: Callable[..., S3Store], s3_server: str
) -> None:
    data = os.urandom(3 * PART)
    writer = make_store()
    info = await writer.create(new_info(len(data)))
    await writer.write_chunk(info.id, 0, stream(data[:MiB]))
    # Dies while staging the second unverified part: nothing of the chunk may count.
    dying = make_store(
        RecordingAPI(
            make_s3_client(endpoint_url=s3_server, region="us-east-1"),
            crash_at("put_object", key_suffix=".verify.2"),
        )
    )
    with pytest.raises(SimulatedCrash):
        await dying.write_chunk(info.id, MiB, stream(data[MiB:]), check=lambda: True)
    fresh = make_store()
    assert (await fresh.get_info(info.id)).offset == MiB
    # Dies after verification, between copying the staged parts in: the record is written once
    # every verified part is in, so nothing of the chunk counts yet.
    dying = make_store(
        RecordingAPI(
            make_s3_client(endpoint_url=s3_server, region="us-east-1"),
            crash_at("upload_part_copy", nth=2),
        )
    )
    with pytest.raises(SimulatedCrash):
        await dying.write_chunk(info.id, MiB, stream(data[MiB : 3 * PART - 1]), check=lambda: True)
    offset = (await fresh.get_info(info.id)).offset
    assert offset == MiB
    await fresh.write_chunk(info.id, offset, stream(data[offset:]), check=lambda: True)
    assert await read_all(fresh, info.id) == data


async def test_crash_before_completion_is_repaired_on_next_look(
    make_store: Callable[..., S3Store], s3_server: str, client: Any, s3_bucket: str
) -> None:
    data = os.urandom(PART + 99)
    writer = make_store()
    info = await writer.create(new_info(len(data)))
    dying = make_store(
        RecordingAPI(
            make_s3_client(endpoint_url=s3_server, region="us-east-1"),
            crash_at("complete_multipart_upload"),
        )
    )
    with pytest.raises(SimulatedCrash):
        await dying.write_chunk(info.id, 0, stream(data))
    fresh = make_store()
    got = await fresh.get_info(info.id)  # every byte is in parts: completing is all that is left
    assert got.is_complete
    assert client.head_object(Bucket=s3_bucket, Key=PREFIX + info.id)["ContentLength"] == len(data)
    assert await read_all(fresh, info.id) == data


@pytest.mark.parametrize("nth", [1, 2, 3], ids=["first-part", "second-part", "tail"])
async def test_crash_between_s3_and_the_record(
    make_store: Callable[..., S3Store], upload_records: KvRecords, nth: int
) -> None:
    """A part (or tail) is in S3 but the record update that would count it never happens: the
    offset counts only what the record says, and resuming from it gives the right file (the
    part number is uploaded again, replacing the unrecorded one)."""
    data = os.urandom(3 * PART)
    info = await make_store().create(new_info(len(data)))
    dying = make_store(records=DyingRecords(upload_records, "update", nth))
    with pytest.raises(SimulatedCrash):
        await dying.write_chunk(info.id, 0, stream(data[: 2 * PART + 10]))
    fresh = make_store()
    offset = (await fresh.get_info(info.id)).offset
    assert offset == (nth - 1) * PART
    await fresh.write_chunk(info.id, offset, stream(data[offset:]))
    assert hashlib.sha256(await read_all(fresh, info.id)).digest() == hashlib.sha256(data).digest()


async def test_a_writer_whose_record_is_stale_records_nothing(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    """Two instances write the same upload at once (a lock lost to a NATS outage): the first to
    record wins; the other's record update is refused and its request ends, and the file is
    exactly the winner's bytes."""
    import asyncio

    data = os.urandom(2 * PART)
    a, b = make_store(), make_store()
    info = await a.create(new_info(len(data)))
    started = asyncio.Event()
    go_on = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:MiB]
        started.set()
        await go_on.wait()
        yield data[MiB:PART]  # fills part 1: its record update comes after b's

    stale = asyncio.ensure_future(a.write_chunk(info.id, 0, stalled()))
    await started.wait()
    assert await b.write_chunk(info.id, 0, stream(data[:PART + 10])) == PART + 10
    go_on.set()
    with pytest.raises(RecordChanged):
        await stale
    assert (await b.get_info(info.id)).offset == PART + 10
    await b.write_chunk(info.id, PART + 10, stream(data[PART + 10 :]))
    assert await read_all(b, info.id) == data


async def test_concurrent_info_changes_from_two_instances_both_land(
    make_store: Callable[..., S3Store],
) -> None:
    """Revision-checked updates: two finals created at once on two instances both register with
    the same partial (a blind write would drop one)."""
    import asyncio

    a, b = make_store(), make_store()
    partial = await a.create(new_info(10, is_partial=True))
    finals = [os.urandom(16).hex() for _ in range(8)]
    stores = [a, b] * 4

    def adds(final_id: str) -> Callable[[UploadInfo], UploadInfo]:
        return lambda i: i.replace(part_of=(*i.part_of, final_id))

    await asyncio.gather(
        *(s.update_info(partial.id, adds(f)) for s, f in zip(stores, finals, strict=True))
    )
    assert sorted((await a.get_info(partial.id)).part_of) == sorted(finals)


async def test_nats_down_is_store_unavailable(
    s3_server: str, s3_bucket: str, nats_url: str
) -> None:
    from events.bus import EventBus

    bus = EventBus(nats_url, manage_stream=False)  # never started: not connected
    store = S3Store(make_s3_client(endpoint_url=s3_server, region="us-east-1"), s3_bucket, KvRecords(bus))
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_info("0" * 32)
        with pytest.raises(StoreUnavailable):
            await store.create(new_info(5))
    finally:
        store.close()


async def test_client_gone_mid_part_keeps_what_arrived(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    data = os.urandom(PART + PART // 2)
    info = await store.create(new_info(3 * PART))
    with pytest.raises(ConnectionResetError):
        await store.write_chunk(info.id, 0, broken(data))
    assert (await store.get_info(info.id)).offset == len(data)


@pytest.mark.parametrize("during_upload", [False, True], ids=["reading", "part-in-flight"])
async def test_cancelled_write_keeps_what_arrived(
    make_store: Callable[..., S3Store], s3_server: str, during_upload: bool
) -> None:
    """aiohttp cancels the handler when the client goes away: the bytes that arrived stay."""
    import asyncio
    import threading

    api = RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"))
    store = make_store(api)
    data = os.urandom(PART + MiB)
    info = await store.create(new_info(3 * PART))
    arrived = asyncio.Event()
    uploading = threading.Event()
    release = threading.Event()

    def slow_part(name: str, kwargs: dict[str, Any]) -> None:
        if name == "upload_part" and during_upload:
            uploading.set()
            release.wait(10)  # the part is on its way while the request is cancelled

    api.on_call = slow_part

    async def body() -> AsyncIterator[bytes]:
        async for piece in stream(data):
            yield piece
        arrived.set()
        await asyncio.Event().wait()  # the client stalls, then goes away

    task = asyncio.ensure_future(store.write_chunk(info.id, 0, body()))
    if during_upload:
        await asyncio.to_thread(uploading.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        release.set()
    else:
        await arrived.wait()
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.get_info(info.id)).offset == len(data)


# -- listing and sweeping --------------------------------------------------------------------


async def test_list_uploads_and_orphan_sweep(
    make_store: Callable[..., S3Store], client: Any, s3_bucket: str
) -> None:
    store = make_store(orphan_grace=0.0)
    live = await store.create(new_info(3 * PART))
    await store.write_chunk(live.id, 0, stream(b"x" * 1000))
    tomb = await store.create(new_info(10))
    await store.discard_bytes(tomb.id, "expired")
    # A crash between CreateMultipartUpload and the record, a tail a crash left unrecorded,
    # a tombstone's leftover bytes:
    orphan_id = os.urandom(16).hex()
    client.create_multipart_upload(Bucket=s3_bucket, Key=PREFIX + orphan_id)
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}{orphan_id}.tail.2", Body=b"zz")
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}{live.id}.tail.2000", Body=b"zz")
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}{tomb.id}.tail.2", Body=b"zz")
    client.put_object(Bucket=s3_bucket, Key="unrelated/file", Body=b"keep me")
    listed = {i.id: i async for i in store.list_uploads()}
    assert set(listed) == {live.id, tomb.id}
    assert listed[live.id].offset == 1000 and listed[tomb.id].gone == "expired"
    assert keys(client, s3_bucket) == {f"{PREFIX}{live.id}.tail.1000", "unrelated/file"}
    assert [u["Key"] for u in multipart_uploads(client, s3_bucket)] == [PREFIX + live.id]


async def test_updated_at_follows_the_last_byte(make_store: Callable[..., S3Store]) -> None:
    store = make_store()
    info = await store.create(new_info(100, created_at=1.0, updated_at=1.0))
    await store.write_chunk(info.id, 0, stream(b"abc"))
    assert (await store.get_info(info.id)).updated_at > 1000.0


# -- errors at the edge ----------------------------------------------------------------------


async def test_s3_errors_become_store_unavailable(
    s3_server: str, make_store: Callable[..., S3Store], upload_records: KvRecords
) -> None:
    records = upload_records
    dead = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = make_store(dead)
    with pytest.raises(StoreUnavailable):
        await store.create(new_info(5))
    dead.close()
    missing_bucket = S3Store(
        make_s3_client(endpoint_url=s3_server, region="us-east-1"), "no-such-bucket", records
    )
    with pytest.raises(StoreUnavailable):
        await missing_bucket.create(new_info(5))
    missing_bucket.close()


async def test_composer_sees_every_capability(make_store: Callable[..., S3Store]) -> None:
    composer = StoreComposer(make_store())
    assert composer.extensions(expiration=True) == [
        "creation",
        "creation-with-upload",
        "checksum",
        "creation-defer-length",
        "expiration",
        "termination",
        "concatenation",
        "concatenation-unfinished",
    ]


# -- the per-instance budget of part buffers -------------------------------------------------


async def test_concurrent_writes_share_the_budget_of_part_buffers(
    make_store: Callable[..., S3Store], s3_server: str
) -> None:
    """Six writes of three parts each, at once, with room for three part buffers: never more
    is taken (the writes take turns instead), and every upload is intact."""
    import asyncio

    api = RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"))
    store = make_store(api, buffer_limit=3 * PART, buffer_wait=60)
    assert store.budget is not None
    in_use_at_upload: list[int] = []
    api.on_call = lambda name, kw: (
        in_use_at_upload.append(store.budget.in_use) if name == "upload_part" else None
    )
    datas = [os.urandom(3 * PART - 1000 * i) for i in range(6)]
    infos = [await store.create(new_info(len(d))) for d in datas]
    written = await asyncio.gather(
        *(store.write_chunk(i.id, 0, stream(d)) for i, d in zip(infos, datas, strict=True))
    )
    assert written == [len(d) for d in datas]
    assert store.budget.peak == 3 * PART  # it was the limit that bound, and it held
    assert max(in_use_at_upload) <= 3 * PART
    assert store.budget.in_use == 0  # everything given back
    for info, data in zip(infos, datas, strict=True):
        assert await read_all(store, info.id) == data


async def test_no_room_in_the_budget_is_503_and_keeps_what_arrived(
    make_store: Callable[..., S3Store], s3_server: str
) -> None:
    """Room for one part buffer; its part's upload to S3 stalls. The write that sent it needs a
    second buffer for its last 10 bytes, another write needs one to start: both give up after
    the wait (503 for their clients). What had arrived -- the part on its way -- is kept."""
    import asyncio
    import threading

    from gateway.store.budget import BudgetExhausted

    api = RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"))
    store = make_store(api, buffer_limit=PART, buffer_wait=0.3)
    release = threading.Event()
    api.on_call = lambda name, kw: release.wait(20) if name == "upload_part" else None
    first = await store.create(new_info(2 * PART))
    second = await store.create(new_info(2 * PART))
    stalled = asyncio.ensure_future(store.write_chunk(first.id, 0, stream(os.urandom(PART + 10))))
    await asyncio.sleep(0.2)  # its first part is on its way to S3, holding the budget
    with pytest.raises(BudgetExhausted):
        await store.write_chunk(second.id, 0, stream(os.urandom(MiB)))
    assert (await store.get_info(second.id)).offset == 0  # nothing taken in, nothing counted
    release.set()
    with pytest.raises(BudgetExhausted):
        await stalled
    assert (await store.get_info(first.id)).offset == PART  # the part in flight was kept
    assert store.budget is not None and store.budget.in_use == 0


# -- memory ----------------------------------------------------------------------------------


async def test_memory_per_request_is_bounded_by_the_part_size(
    make_store: Callable[..., S3Store], s3_server: str
) -> None:
    """Measured where it is largest -- while a part is being uploaded: the store's own
    allocations stay under two part buffers (with bytearray's 12.5 % growth slack) and a
    chunk, for a write of six parts in one request."""
    api = RecordingAPI(make_s3_client(endpoint_url=s3_server, region="us-east-1"))
    store = make_store(api)
    peak = 0
    only_store = [tracemalloc.Filter(True, "*gateway/store/s3store.py")]

    def measure(name: str, kwargs: dict[str, Any]) -> None:
        nonlocal peak
        if name == "upload_part":
            snapshot = tracemalloc.take_snapshot().filter_traces(only_store)
            peak = max(peak, sum(s.size for s in snapshot.statistics("filename")))

    api.on_call = measure
    info = await store.create(new_info(6 * PART + 1))
    tracemalloc.start()
    try:
        await store.write_chunk(info.id, 0, pieces(6 * PART + 1, 256 * 1024))
    finally:
        tracemalloc.stop()
    assert PART < peak <= 2.25 * PART + 256 * 1024


async def pieces(total: int, size: int) -> AsyncIterator[bytes]:
    block = os.urandom(size)
    for start in range(0, total, size):
        yield block[: min(size, total - start)]
