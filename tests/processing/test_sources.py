"""FileSource and the checkpoint stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processing.destinations import FileCheckpointStore, MemoryCheckpointStore
from processing.sources import ByteSource, FileSource, SourceError, read_range


async def collect(source: ByteSource, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in source.open_range(start, end)]


async def test_file_source_ranges_in_bounded_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    source = FileSource(path, chunk_size=1000)
    assert isinstance(source, ByteSource)
    assert source.size == len(data)
    chunks = await collect(source, 100, 5100)
    assert [len(c) for c in chunks] == [1000] * 5
    assert b"".join(chunks) == data[100:5100]
    assert await collect(source, 7, 7) == []
    assert await read_range(source, 0, source.size) == data
    for start, end in ((-1, 5), (5, 4), (0, len(data) + 1)):
        with pytest.raises(ValueError):
            await collect(source, start, end)


async def test_file_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as caught:
        FileSource(tmp_path / "missing")
    assert not caught.value.retryable
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    source = FileSource(path)
    path.write_bytes(b"x" * 10)
    with pytest.raises(SourceError, match="ended at byte 10"):
        await collect(source, 0, 100)
    path.unlink()
    with pytest.raises(SourceError):
        await collect(source, 0, 100)


async def test_stopping_early_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10_000)
    chunks = FileSource(path, chunk_size=100).open_range(0, 10_000)
    assert await anext(chunks) == b"x" * 100
    await chunks.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_checkpoint_stores(kind: str, tmp_path: Path) -> None:
    store = MemoryCheckpointStore() if kind == "memory" else FileCheckpointStore(tmp_path / "ckpt")
    assert await store.load("k") is None
    await store.save("k", {"upload_url": "https://x/up/1", "bytes_done": 5})
    await store.save("../../evil", {"a": [1, 2]})
    assert await store.load("k") == {"upload_url": "https://x/up/1", "bytes_done": 5}
    assert await store.load("../../evil") == {"a": [1, 2]}
    state = await store.load("k")
    assert state is not None
    state["bytes_done"] = 99  # a copy: changing it changes nothing stored
    assert (await store.load("k") or {})["bytes_done"] == 5
    await store.delete("k")
    await store.delete("k")
    assert await store.load("k") is None
    with pytest.raises(TypeError):
        await store.save("k", {"not json": object()})


async def test_file_checkpoints_survive_a_new_store_and_ignore_garbage(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    await FileCheckpointStore(directory).save("upload-1", {"n": 1})
    assert await FileCheckpointStore(directory).load("upload-1") == {"n": 1}
    files = list(directory.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and ".." not in files[0].name
    files[0].write_text("{torn")
    assert await FileCheckpointStore(directory).load("upload-1") is None
    files[0].write_text(json.dumps({"key": "other", "state": {}}))
    assert await FileCheckpointStore(directory).load("upload-1") is None
