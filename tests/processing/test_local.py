"""Local-folder destination: atomic, conflict-aware, never outside its root."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processing.destinations import (
    ChecksumMismatch,
    DeliveryCanceled,
    DeliveryConflict,
    DeliveryTarget,
    InvalidTarget,
    LocalFolderDestination,
    Manifest,
    MemoryCheckpointStore,
    SourceFailed,
)
from processing.sources import ByteSource
from tests.processing.support import FailingSource, SourceFile

MakeSource = Callable[..., SourceFile]


def target(path: str = "alice/2024-05-01/report.pdf", **kwargs: object) -> DeliveryTarget:
    return DeliveryTarget(key="upload-1", path=path, **kwargs)  # type: ignore[arg-type]


def visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class GatedSource:
    """Yields its first chunk, then waits for ``release`` before the rest."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.first_chunk_sent = asyncio.Event()
        self.release = asyncio.Event()

    @property
    def size(self) -> int:
        return self.inner.size

    async def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        async for chunk in self.inner.open_range(start, end):
            yield chunk
            self.first_chunk_sent.set()
            await self.release.wait()


async def test_delivers_with_sha256_and_progress(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    src = make_source(3 * 1024 * 1024 + 7, chunk_size=1024 * 1024)
    checkpoints = MemoryCheckpointStore()
    await checkpoints.save("upload-1", {"stale": True})
    seen: list[int] = []

    async def progress(done: int) -> None:
        seen.append(done)

    result = await local.deliver(
        src.source, target(sha256=src.sha256), checkpoint=checkpoints, progress=progress
    )
    delivered = local_root / "alice/2024-05-01/report.pdf"
    assert delivered.read_bytes() == src.path.read_bytes()
    assert result.sha256 == src.sha256 and result.size == src.size
    assert result.path == result.item_id == "alice/2024-05-01/report.pdf"
    assert result.destination == "local:alice/2024-05-01/report.pdf"
    assert result.web_url == delivered.resolve().as_uri()
    assert seen == [1024 * 1024, 2 * 1024 * 1024, 3 * 1024 * 1024, src.size]
    assert checkpoints.keys() == []
    assert visible_files(local_root) == ["alice/2024-05-01/report.pdf"]


async def test_empty_file(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    src = make_source(0)
    result = await local.deliver(
        src.source, target("empty.bin"), checkpoint=MemoryCheckpointStore()
    )
    assert (local_root / "empty.bin").read_bytes() == b""
    assert result.sha256 == src.sha256


async def test_no_partial_file_is_ever_visible(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    gated = GatedSource(make_source(3 * 1024 * 1024, chunk_size=1024 * 1024).source)
    task = asyncio.create_task(local.deliver(gated, target(), checkpoint=MemoryCheckpointStore()))
    await gated.first_chunk_sent.wait()
    directory = local_root / "alice/2024-05-01"
    names = os.listdir(directory)
    assert "report.pdf" not in names
    assert (
        len(names) == 1
        and names[0].startswith(".report.pdf.")
        and names[0].endswith(".tusgate-part")
    )
    gated.release.set()
    await task
    assert os.listdir(directory) == ["report.pdf"]


async def test_conflict_fail(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    (local_root / "docs").mkdir(parents=True)
    (local_root / "docs/a.txt").write_bytes(b"older")
    with pytest.raises(DeliveryConflict) as caught:
        await local.deliver(
            make_source(100).source, target("docs/a.txt"), checkpoint=MemoryCheckpointStore()
        )
    assert not caught.value.retryable
    assert (local_root / "docs/a.txt").read_bytes() == b"older"
    assert visible_files(local_root) == ["docs/a.txt"], "no temp file left behind"


async def test_conflict_fail_with_identical_bytes_is_a_redelivery(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    src = make_source(1000)
    first = await local.deliver(src.source, target("a.bin"), checkpoint=MemoryCheckpointStore())
    again = await local.deliver(src.source, target("a.bin"), checkpoint=MemoryCheckpointStore())
    assert again == first
    assert visible_files(local_root) == ["a.bin"]


async def test_conflict_replace(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    local_root.mkdir()
    (local_root / "a.txt").write_bytes(b"older")
    src = make_source(100)
    await local.deliver(
        src.source, target("a.txt", conflict="replace"), checkpoint=MemoryCheckpointStore()
    )
    assert (local_root / "a.txt").read_bytes() == src.path.read_bytes()
    assert visible_files(local_root) == ["a.txt"]


async def test_conflict_rename(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    local_root.mkdir()
    (local_root / "a.tar.gz").write_bytes(b"older")
    paths = []
    for _ in range(2):
        result = await local.deliver(
            make_source(10).source,
            target("a.tar.gz", conflict="rename"),
            checkpoint=MemoryCheckpointStore(),
        )
        paths.append(result.path)
    assert paths == ["a.tar (1).gz", "a.tar (2).gz"]
    assert (local_root / "a.tar.gz").read_bytes() == b"older"
    assert visible_files(local_root) == ["a.tar (1).gz", "a.tar (2).gz", "a.tar.gz"]


@pytest.mark.parametrize(
    "path",
    [
        "../escape.txt",
        "/etc/passwd",
        "a/../../escape.txt",
        "a/./b.txt",
        "a//b.txt",
        "a\\..\\b.txt",
        "",
        "CON",
        "x/.hidden",
    ],
)
async def test_traversal_and_unclean_paths_are_refused(
    path: str, tmp_path: Path, local: LocalFolderDestination, make_source: MakeSource
) -> None:
    before = sorted(tmp_path.parent.iterdir())
    with pytest.raises(InvalidTarget):
        await local.deliver(
            make_source(10).source, target(path), checkpoint=MemoryCheckpointStore()
        )
    assert sorted(tmp_path.parent.iterdir()) == before
    assert not (tmp_path / "escape.txt").exists()


async def test_symlink_out_of_the_root_is_refused(
    tmp_path: Path, local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    local_root.mkdir()
    (local_root / "link").symlink_to(outside)
    with pytest.raises(InvalidTarget):
        await local.deliver(
            make_source(10).source, target("link/x.bin"), checkpoint=MemoryCheckpointStore()
        )
    assert list(outside.iterdir()) == []


async def test_cancel_leaves_nothing(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    gated = GatedSource(make_source(3 * 1024 * 1024, chunk_size=1024 * 1024).source)
    cancel = asyncio.Event()
    task = asyncio.create_task(
        local.deliver(gated, target(), checkpoint=MemoryCheckpointStore(), cancel=cancel)
    )
    await gated.first_chunk_sent.wait()
    cancel.set()
    gated.release.set()
    with pytest.raises(DeliveryCanceled):
        await task
    assert visible_files(local_root) == []


async def test_declared_checksum_mismatch(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    with pytest.raises(ChecksumMismatch):
        await local.deliver(
            make_source(100).source, target(sha256="ab" * 32), checkpoint=MemoryCheckpointStore()
        )
    assert visible_files(local_root) == []


async def test_source_failure_is_translated(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    src = make_source(1000)
    with pytest.raises(SourceFailed) as caught:
        await local.deliver(
            FailingSource(src.source, 10), target(), checkpoint=MemoryCheckpointStore()
        )
    assert caught.value.retryable
    src.path.write_bytes(b"short")  # the staged file shrank under us
    with pytest.raises(SourceFailed) as caught:
        await local.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert not caught.value.retryable
    assert visible_files(local_root) == []


async def test_the_source_s_own_error_code_is_kept(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    changed = FailingSource(make_source(1000).source, 10, code="source_changed", retryable=False)
    with pytest.raises(SourceFailed) as caught:
        await local.deliver(changed, target(), checkpoint=MemoryCheckpointStore())
    assert caught.value.code == "source_changed" and not caught.value.retryable
    assert visible_files(local_root) == []


async def test_manifest(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    src = make_source(1234)
    result = await local.deliver(
        src.source, target(content_type="application/pdf"), checkpoint=MemoryCheckpointStore()
    )
    manifest = Manifest.for_result(
        result,
        content_type="application/pdf",
        owner="alice",
        source={"upload": "upload-1"},
        metadata={"filename": "report.pdf", "note": None},
        created_at=datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
        delivered_at=datetime(2024, 5, 1, 9, 31, tzinfo=UTC),
    )
    path = await local.write_manifest(result, manifest)
    assert path == "alice/2024-05-01/report.pdf.manifest.json"
    body = json.loads((local_root / path).read_text())
    assert body == {
        "schema": "tusgate.manifest.v1",
        "name": "report.pdf",
        "size": 1234,
        "sha256": src.sha256,
        "content_type": "application/pdf",
        "owner": "alice",
        "source": {"upload": "upload-1"},
        "created_at": "2024-05-01T09:30:00Z",
        "delivered_at": "2024-05-01T09:31:00Z",
        "destination": "local:alice/2024-05-01/report.pdf",
        "item_id": "alice/2024-05-01/report.pdf",
        "web_url": result.web_url,
        "metadata": {"filename": "report.pdf", "note": None},
    }
    # Writing it again replaces it atomically.
    await local.write_manifest(result, manifest)
    assert visible_files(local_root) == [
        "alice/2024-05-01/report.pdf",
        "alice/2024-05-01/report.pdf.manifest.json",
    ]


async def test_abort_forgets_state(local: LocalFolderDestination) -> None:
    checkpoints = MemoryCheckpointStore()
    await checkpoints.save("upload-1", {"x": 1})
    await local.abort("upload-1", checkpoints)
    await local.aclose()
    assert checkpoints.keys() == []


async def test_a_dead_deliverys_temp_file_is_removed_by_the_next_one(
    local: LocalFolderDestination, local_root: Path, make_source: MakeSource
) -> None:
    """A worker killed mid-delivery leaves its temp file; the next delivery to that name removes
    it once it is stale, and never touches a temp file still being written."""
    from processing.destinations.local import STALE_TEMP_AGE

    folder = local_root / "alice/2024-05-01"
    folder.mkdir(parents=True)
    dead = folder / ".report.pdf.dead1234.tusgate-part"
    live = folder / ".report.pdf.live5678.tusgate-part"
    other = folder / ".other.pdf.dead9999.tusgate-part"
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    long_ago = datetime.now(UTC).timestamp() - STALE_TEMP_AGE - 60
    os.utime(dead, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    src = make_source(1000)
    await local.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert not dead.exists()
    assert live.exists() and other.exists()  # in progress / another name's: not this one's
    assert (folder / "report.pdf").read_bytes() == src.path.read_bytes()
