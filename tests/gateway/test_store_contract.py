"""The contract every store must pass. Add a store by adding a factory to `STORES`.

The handlers rely on exactly these behaviours: the offset is what is durably stored, a body that
breaks off keeps what arrived, a checksummed chunk is all-or-nothing, termination makes an id
unknown, a discarded upload answers "gone", concatenation puts parts in order.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from gateway.store.base import (
    DataStore,
    OffsetConflict,
    StoreComposer,
    UploadGone,
    UploadInfo,
    UploadNotFound,
)
from gateway.store.filestore import FileStore
from gateway.store.s3parts import MIN_PART_SIZE
from gateway.store.s3store import S3Store, make_s3_client

MiB = 1024 * 1024

# A factory gets the test's request (for infrastructure fixtures) and a temporary directory.
StoreFactory = Callable[[pytest.FixtureRequest, Path], DataStore]


def s3_store(request: pytest.FixtureRequest, tmp: Path) -> DataStore:
    """The S3 store on a moto server, with the smallest part size S3 allows, so the 5 MiB
    sizes below cross part boundaries."""
    endpoint: str = request.getfixturevalue("s3_server")
    store = S3Store(
        make_s3_client(endpoint_url=endpoint, region="us-east-1"),
        request.getfixturevalue("s3_bucket"),
        request.getfixturevalue("upload_records"),
        prefix="uploads/",
        endpoint_url=endpoint,
        part_size=MIN_PART_SIZE,
    )
    request.addfinalizer(store.close)
    return store


STORES: dict[str, StoreFactory] = {
    "file": lambda request, tmp: FileStore(tmp / "uploads"),
    "s3": s3_store,
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreComposer:
    return StoreComposer(STORES[request.param](request, tmp_path))


def new_info(size: int | None, **kw: object) -> UploadInfo:
    return UploadInfo(id=os.urandom(16).hex(), size=size, **kw)  # type: ignore[arg-type]


async def stream(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def broken_stream(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    raise ConnectionResetError("client went away")


async def read_all(store: StoreComposer, upload_id: str, start: int = 0, end: int | None = None) -> bytes:
    assert store.reader is not None
    return b"".join([c async for c in store.reader.read(upload_id, start, end)])


async def test_create_then_get_info(store: StoreComposer) -> None:
    info = await store.core.create(new_info(10, metadata_raw="a YQ==,b", owner="alice"))
    got = await store.core.get_info(info.id)
    assert (got.offset, got.size, got.metadata_raw, got.owner) == (0, 10, "a YQ==,b", "alice")
    assert got.metadata == {"a": "a", "b": None}
    assert got.storage  # says where the bytes live, for processing


@pytest.mark.parametrize("size", [0, 1, 5 * MiB - 1, 5 * MiB, 5 * MiB + 1])
@pytest.mark.parametrize("pieces", [1, 3])
async def test_sizes_written_over_several_requests(store: StoreComposer, size: int, pieces: int) -> None:
    data = os.urandom(size)
    info = await store.core.create(new_info(size))
    bounds = [size * i // pieces for i in range(pieces + 1)]
    for start, end in itertools.pairwise(bounds):
        chunks = [data[i : min(i + 100_000, end)] for i in range(start, end, 100_000)]
        written = await store.core.write_chunk(info.id, start, stream(chunks))
        assert written == end - start
        assert (await store.core.get_info(info.id)).offset == end
    final = await store.core.get_info(info.id)
    assert final.is_complete
    assert hashlib.sha256(await read_all(store, info.id)).digest() == hashlib.sha256(data).digest()


async def test_broken_body_keeps_what_arrived(store: StoreComposer) -> None:
    info = await store.core.create(new_info(100))
    with pytest.raises(ConnectionResetError):
        await store.core.write_chunk(info.id, 0, broken_stream([b"abc", b"def"]))
    assert (await store.core.get_info(info.id)).offset == 6
    assert await read_all(store, info.id) == b"abcdef"


async def test_checksummed_chunk_is_all_or_nothing(store: StoreComposer) -> None:
    info = await store.core.create(new_info(100))
    await store.core.write_chunk(info.id, 0, stream([b"keep"]))
    assert await store.core.write_chunk(info.id, 4, stream([b"bad"]), check=lambda: False) == 0
    assert (await store.core.get_info(info.id)).offset == 4
    with pytest.raises(ConnectionResetError):
        await store.core.write_chunk(info.id, 4, broken_stream([b"cut"]), check=lambda: True)
    assert (await store.core.get_info(info.id)).offset == 4
    assert await store.core.write_chunk(info.id, 4, stream([b"good"]), check=lambda: True) == 4
    assert await read_all(store, info.id) == b"keepgood"


async def test_write_at_wrong_offset_is_refused(store: StoreComposer) -> None:
    info = await store.core.create(new_info(10))
    await store.core.write_chunk(info.id, 0, stream([b"abc"]))
    with pytest.raises(OffsetConflict):
        await store.core.write_chunk(info.id, 1, stream([b"x"]))
    assert await read_all(store, info.id) == b"abc"


async def test_unknown_and_odd_ids(store: StoreComposer) -> None:
    for upload_id in ["0" * 32, "../../etc/passwd", "", "A" * 32, "a" * 33]:
        with pytest.raises(UploadNotFound):
            await store.core.get_info(upload_id)


async def test_declare_length(store: StoreComposer) -> None:
    assert store.length_deferrer is not None
    info = await store.core.create(new_info(None))
    assert (await store.core.get_info(info.id)).size_is_deferred
    await store.core.write_chunk(info.id, 0, stream([b"ab"]))
    await store.length_deferrer.declare_length(info.id, 2)
    assert (await store.core.get_info(info.id)).is_complete


async def test_read_ranges(store: StoreComposer) -> None:
    data = os.urandom(700_000)
    info = await store.core.create(new_info(len(data)))
    await store.core.write_chunk(info.id, 0, stream([data]))
    assert await read_all(store, info.id, 10, 20) == data[10:20]
    assert await read_all(store, info.id, 300_000) == data[300_000:]
    assert await read_all(store, info.id, 0, 0) == b""


async def test_terminate(store: StoreComposer) -> None:
    assert store.terminater is not None
    info = await store.core.create(new_info(3))
    await store.core.write_chunk(info.id, 0, stream([b"abc"]))
    await store.terminater.terminate(info.id)
    with pytest.raises(UploadNotFound):
        await store.core.get_info(info.id)
    with pytest.raises(UploadNotFound):
        await store.terminater.terminate(info.id)


async def test_discard_bytes_leaves_a_tombstone(store: StoreComposer) -> None:
    assert store.lister is not None
    info = await store.core.create(new_info(3))
    await store.lister.discard_bytes(info.id, "expired")
    with pytest.raises(UploadGone) as gone:
        await store.core.get_info(info.id)
    assert gone.value.reason == "expired"
    listed = {i.id: i for i in [x async for x in store.lister.list_uploads()]}
    assert listed[info.id].gone == "expired"


async def test_concat_in_order(store: StoreComposer) -> None:
    assert store.concater is not None
    parts = [os.urandom(n) for n in (5 * MiB + 3, 17, 1000)]
    infos = []
    for part in parts:
        info = await store.core.create(new_info(len(part), is_partial=True))
        await store.core.write_chunk(info.id, 0, stream([part]))
        infos.append(await store.core.get_info(info.id))
    final = await store.core.create(
        new_info(None, partial_uploads=tuple(i.id for i in infos), assembled=False)
    )
    await store.concater.concat(final, infos)
    size = sum(map(len, parts))
    await store.core.update_info(final.id, lambda i: i.replace(size=size, assembled=True))
    got = await store.core.get_info(final.id)
    assert got.is_complete
    assert await read_all(store, final.id) == b"".join(parts)
    for info in infos:  # partials are untouched
        assert (await store.core.get_info(info.id)).offset == info.size


async def test_update_info_changes_fields_but_never_the_offset(store: StoreComposer) -> None:
    info = await store.core.create(new_info(10, metadata_raw="a YQ=="))
    await store.core.write_chunk(info.id, 0, stream([b"abcd"]))
    got = await store.core.update_info(
        info.id, lambda i: i.replace(part_of=(*i.part_of, "f" * 32), offset=0)
    )
    assert (got.offset, got.part_of, got.metadata_raw) == (4, ("f" * 32,), "a YQ==")
    again = await store.core.get_info(info.id)
    assert (again.offset, again.part_of) == (4, ("f" * 32,))
    with pytest.raises(UploadNotFound):
        await store.core.update_info("0" * 32, lambda i: i)


async def test_discard_bytes_only_if_the_condition_holds(store: StoreComposer) -> None:
    assert store.lister is not None
    info = await store.core.create(new_info(10))
    await store.core.write_chunk(info.id, 0, stream([b"abc"]))
    seen: list[int] = []

    def still_short(current: UploadInfo) -> bool:
        seen.append(current.offset)
        return current.offset < 3

    assert not await store.lister.discard_bytes(info.id, "expired", only_if=still_short)
    assert seen == [3]  # judged on the current info, offset included
    assert (await store.core.get_info(info.id)).offset == 3
    assert await store.lister.discard_bytes(info.id, "expired", only_if=lambda i: True)
    assert not await store.lister.discard_bytes(info.id, "expired")  # already a tombstone
    with pytest.raises(UploadGone):
        await store.core.get_info(info.id)
