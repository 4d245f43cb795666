"""OneDrive destination against the Graph-compatible test server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processing.destinations import (
    ChecksumMismatch,
    DeliveryCanceled,
    DeliveryConflict,
    DeliveryTarget,
    DestinationUnavailable,
    FileCheckpointStore,
    InvalidTarget,
    Manifest,
    MemoryCheckpointStore,
    OneDriveDestination,
    OneDriveSettings,
    SourceFailed,
    Unauthorized,
)
from processing.destinations.graph_http import drive_path
from tests.graph_server import GraphTestServer
from tests.processing.support import TEST_FRAGMENT, FailingSource, SourceFile

MiB = 1024 * 1024
MakeOneDrive = Callable[..., OneDriveDestination]
MakeSource = Callable[..., SourceFile]


def target(
    key: str = "upload-1", path: str = "alice/2024-05-01/data.bin", **kwargs: object
) -> DeliveryTarget:
    return DeliveryTarget(key=key, path=path, **kwargs)  # type: ignore[arg-type]


def assert_one_file(server: GraphTestServer, path: str, sha256: str) -> None:
    files = server.files()
    assert list(files) == [path]
    assert files[path].sha256 == sha256
    assert server.open_sessions == 0


def assert_no_auth_on_upload_url(server: GraphTestServer) -> None:
    upload_calls = [r for r in server.requests if r.operation in ("fragment", "status", "delete")]
    assert not any(r.authorization for r in upload_calls)


@pytest.mark.parametrize("size", [0, 1024, 4 * MiB + 1, 25 * MiB])
async def test_delivers_exact_bytes(
    size: int,
    graph_server: GraphTestServer,
    onedrive: OneDriveDestination,
    make_source: MakeSource,
    checkpoints: MemoryCheckpointStore,
) -> None:
    src = make_source(size)
    seen: list[int] = []

    async def progress(done: int) -> None:
        seen.append(done)

    result = await onedrive.deliver(
        src.source, target(sha256=src.sha256), checkpoint=checkpoints, progress=progress
    )

    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert result.sha256 == src.sha256 and result.size == size
    assert result.item_id == graph_server.files()[result.path].id
    assert result.destination == "onedrive:/me/drive/root:/alice/2024-05-01/data.bin"
    assert result.web_url.startswith(graph_server.origin)
    assert seen == sorted(seen) and seen[-1] == size
    assert checkpoints.keys() == []
    # Small files (including empty ones) go up in one simple upload, large ones by session.
    assert graph_server.sessions_created == (0 if size < 4 * MiB else 1)
    if size > 4 * MiB:
        assert graph_server.count("fragment") == -(-size // TEST_FRAGMENT)
    assert_no_auth_on_upload_url(graph_server)


async def test_throttling_honours_retry_after(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    graph_server.fail("fragment", 429, retry_after=1, nth=3)
    graph_server.fail("fragment", 503, retry_after=1, nth=6)
    started = time.monotonic()
    await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert time.monotonic() - started >= 2.0, "both Retry-After waits were honoured"
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.pending_faults == 0


async def test_server_errors_and_dropped_connections_resume(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    src = make_source(6 * MiB + 12345)
    graph_server.fail("fragment", 500, nth=2)
    graph_server.fail("fragment", 502, nth=4)
    graph_server.drop("fragment", after_bytes=100_000, nth=7)
    graph_server.drop("fragment", after_bytes=0, nth=8)
    graph_server.drop("fragment", response=True, nth=11)  # accepted, but the answer is lost
    graph_server.drop("status", nth=2)  # and the status query after it fails once too
    graph_server.fail("status", 503, retry_after=0, nth=3)
    await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 1
    assert graph_server.pending_faults == 0
    assert graph_server.count("status") >= 5, "every failure was followed by a status query"


async def test_lost_answer_to_the_final_fragment(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    fragments = -(-src.size // TEST_FRAGMENT)
    graph_server.drop("fragment", response=True, nth=fragments)
    result = await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    # The session is gone (completed); the existing item has our bytes: that is success.
    assert_one_file(graph_server, result.path, src.sha256)
    assert graph_server.sessions_created == 1
    assert graph_server.count("item") == 1, "looked the item up instead of uploading again"


async def test_retry_budget_is_bounded_and_keeps_the_session(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    checkpoints = MemoryCheckpointStore()
    graph_server.fail("fragment", 500, times=3)
    with pytest.raises(DestinationUnavailable) as caught:
        await make_onedrive(max_attempts=3).deliver(src.source, target(), checkpoint=checkpoints)
    assert caught.value.retryable
    assert checkpoints.keys() == ["upload-1"], "kept so the next attempt resumes"
    assert graph_server.open_sessions == 1
    await make_onedrive().deliver(src.source, target(), checkpoint=checkpoints)
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 1


@pytest.mark.parametrize("store", ["memory", "file"])
async def test_restarted_worker_resumes_the_same_session(
    store: str,
    tmp_path: Path,
    graph_server: GraphTestServer,
    make_onedrive: MakeOneDrive,
    make_source: MakeSource,
) -> None:
    src = make_source(8 * MiB)
    checkpoints = (
        MemoryCheckpointStore() if store == "memory" else FileCheckpointStore(tmp_path / "ckpt")
    )
    # Worker 1 dies mid-delivery (the store becomes unreachable after ~3 MiB).
    with pytest.raises(SourceFailed) as caught:
        await make_onedrive().deliver(
            FailingSource(src.source, 3 * MiB), target(), checkpoint=checkpoints
        )
    assert getattr(caught.value, "retryable", False)
    state = await checkpoints.load("upload-1")
    assert state is not None and state["upload_url"].startswith(graph_server.origin)
    assert state["path"] == "alice/2024-05-01/data.bin" and state["bytes_done"] > 0
    before = graph_server.count("fragment")

    # Worker 2: a new destination object, same checkpoint store.
    if store == "file":
        checkpoints = FileCheckpointStore(tmp_path / "ckpt")
    result = await make_onedrive().deliver(src.source, target(), checkpoint=checkpoints)

    assert result.sha256 == src.sha256
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 1
    resumed = graph_server.count("fragment") - before
    assert resumed < -(-src.size // TEST_FRAGMENT), "continued where worker 1 stopped"
    assert await checkpoints.load("upload-1") is None


async def test_killed_task_is_resumed(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(6 * MiB)
    checkpoints = MemoryCheckpointStore()
    graph_server.fragment_delay = 0.02
    task = asyncio.create_task(
        make_onedrive().deliver(src.source, target(), checkpoint=checkpoints)
    )
    while graph_server.count("fragment") < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    graph_server.fragment_delay = 0
    await make_onedrive().deliver(src.source, target(), checkpoint=checkpoints)
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 1


async def test_expired_session_starts_over(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(6 * MiB)
    checkpoints = MemoryCheckpointStore()
    expired = False

    async def expire_midway(done: int) -> None:
        nonlocal expired
        if done >= 2 * MiB and not expired:
            expired = True
            graph_server.expire_sessions()

    await make_onedrive().deliver(
        src.source, target(), checkpoint=checkpoints, progress=expire_midway
    )
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 2


async def test_recorded_session_that_expired_is_replaced(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    checkpoints = MemoryCheckpointStore()
    with pytest.raises(SourceFailed):
        await make_onedrive().deliver(
            FailingSource(src.source, 2 * MiB), target(), checkpoint=checkpoints
        )
    graph_server.expire_sessions()
    await make_onedrive().deliver(src.source, target(), checkpoint=checkpoints)
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    assert graph_server.sessions_created == 2


async def test_the_source_s_own_error_code_is_kept(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    changed = FailingSource(
        make_source(5 * MiB).source, 2 * MiB, code="source_changed", retryable=False
    )
    with pytest.raises(SourceFailed) as caught:
        await make_onedrive().deliver(changed, target(), checkpoint=MemoryCheckpointStore())
    assert caught.value.code == "source_changed" and not caught.value.retryable
    assert graph_server.files() == {} and graph_server.open_sessions == 0


async def test_checkpoint_for_another_path_is_not_reused(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    checkpoints = MemoryCheckpointStore()
    with pytest.raises(SourceFailed):
        await make_onedrive().deliver(
            FailingSource(src.source, 2 * MiB), target(), checkpoint=checkpoints
        )
    await make_onedrive().deliver(
        src.source, target(path="elsewhere/data.bin"), checkpoint=checkpoints
    )
    assert_one_file(graph_server, "elsewhere/data.bin", src.sha256)
    assert graph_server.sessions_created == 2, "the old session was deleted, not left open"


@pytest.mark.parametrize("size", [1000, 5 * MiB])
async def test_conflict_fail(
    size: int, graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    existing = graph_server.put_file("alice/2024-05-01/data.bin", b"older file")
    checkpoints = MemoryCheckpointStore()
    with pytest.raises(DeliveryConflict) as caught:
        await onedrive.deliver(make_source(size).source, target(), checkpoint=checkpoints)
    assert not caught.value.retryable
    assert graph_server.files()["alice/2024-05-01/data.bin"].sha256 == existing.sha256
    assert graph_server.open_sessions == 0 and checkpoints.keys() == []


async def test_conflict_at_commit_deletes_the_session(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    checkpoints = MemoryCheckpointStore()

    async def someone_else_writes(done: int) -> None:
        if done >= 2 * MiB and not graph_server.files():
            graph_server.put_file("alice/2024-05-01/data.bin", b"raced")

    with pytest.raises(DeliveryConflict):
        await onedrive.deliver(
            make_source(5 * MiB).source,
            target(),
            checkpoint=checkpoints,
            progress=someone_else_writes,
        )
    assert graph_server.read_bytes("alice/2024-05-01/data.bin") == b"raced"
    assert graph_server.open_sessions == 0 and checkpoints.keys() == []


@pytest.mark.parametrize("size", [1000, 5 * MiB])
async def test_conflict_fail_with_the_same_bytes_is_a_redelivery(
    size: int, graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    src = make_source(size)
    first = await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    again = await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert again.item_id == first.item_id
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)


@pytest.mark.parametrize("size", [1000, 5 * MiB])
async def test_conflict_replace_and_rename(
    size: int, graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    graph_server.put_file("docs/report.pdf", b"old")
    replaced = make_source(size)
    result = await onedrive.deliver(
        replaced.source,
        target(key="r", path="docs/report.pdf", conflict="replace"),
        checkpoint=MemoryCheckpointStore(),
    )
    assert result.path == "docs/report.pdf"
    assert graph_server.files()["docs/report.pdf"].sha256 == replaced.sha256

    renamed = make_source(size)
    result = await onedrive.deliver(
        renamed.source,
        target(key="n", path="docs/report.pdf", conflict="rename"),
        checkpoint=MemoryCheckpointStore(),
    )
    assert result.path == "docs/report 1.pdf"
    assert result.destination.endswith("/root:/docs/report 1.pdf")
    assert graph_server.files()["docs/report 1.pdf"].sha256 == renamed.sha256
    assert sorted(graph_server.files()) == ["docs/report 1.pdf", "docs/report.pdf"]
    assert graph_server.open_sessions == 0


async def test_cancel_during_slow_delivery(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    checkpoints = MemoryCheckpointStore()
    cancel = asyncio.Event()
    graph_server.fragment_delay = 0.05

    async def cancel_soon() -> None:
        while graph_server.count("fragment") < 3:
            await asyncio.sleep(0.01)
        cancel.set()

    canceller = asyncio.create_task(cancel_soon())
    with pytest.raises(DeliveryCanceled):
        await onedrive.deliver(
            make_source(8 * MiB).source, target(), checkpoint=checkpoints, cancel=cancel
        )
    await canceller
    assert graph_server.files() == {}
    assert graph_server.open_sessions == 0
    assert checkpoints.keys() == []
    assert graph_server.count("fragment") < 8 * MiB // TEST_FRAGMENT


async def test_cancel_during_backoff(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    cancel = asyncio.Event()
    graph_server.fail("fragment", 503, retry_after=30, nth=2)
    asyncio.get_running_loop().call_later(0.3, cancel.set)
    started = time.monotonic()
    with pytest.raises(DeliveryCanceled):
        await make_onedrive().deliver(
            make_source(5 * MiB).source, target(), checkpoint=MemoryCheckpointStore(), cancel=cancel
        )
    assert time.monotonic() - started < 5, "the Retry-After sleep was interrupted"
    assert graph_server.open_sessions == 0


async def test_abort_deletes_the_recorded_session(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    checkpoints = MemoryCheckpointStore()
    with pytest.raises(SourceFailed):
        await make_onedrive().deliver(
            FailingSource(src.source, 2 * MiB), target(), checkpoint=checkpoints
        )
    assert graph_server.open_sessions == 1
    destination = make_onedrive()
    await destination.abort("upload-1", checkpoints)
    await destination.abort("upload-1", checkpoints)  # idempotent
    assert graph_server.open_sessions == 0 and checkpoints.keys() == []
    assert graph_server.files() == {}


@pytest.mark.parametrize("size", [1000, 5 * MiB])
async def test_declared_checksum_mismatch_commits_nothing(
    size: int, graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    checkpoints = MemoryCheckpointStore()
    with pytest.raises(ChecksumMismatch) as caught:
        await onedrive.deliver(
            make_source(size).source, target(sha256="0" * 64), checkpoint=checkpoints
        )
    assert not caught.value.retryable
    assert (
        graph_server.files() == {} and graph_server.open_sessions == 0 and checkpoints.keys() == []
    )


async def test_bad_token_is_unauthorized(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    with pytest.raises(Unauthorized) as caught:
        await make_onedrive(token="expired").deliver(
            make_source(5 * MiB).source, target(), checkpoint=MemoryCheckpointStore()
        )
    assert not caught.value.retryable and caught.value.code == "unauthorized"


async def test_throttled_session_creation_goes_through_graph_middleware(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    graph_server.fail("create", 429, retry_after=1)
    graph_server.fail("create", 503, retry_after=0)
    # max_attempts=1: our own loop gives up at the first failure, so the two retries that
    # make this succeed are msgraph-core's RetryHandler honouring Retry-After.
    destination = make_onedrive(max_attempts=1)
    await destination.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    assert_one_file(graph_server, "alice/2024-05-01/data.bin", src.sha256)
    creates = [r for r in graph_server.requests if r.operation == "create"]
    assert len(creates) == 3 and all(r.authorization for r in creates)


async def test_sessions_for_all_but_empty_files(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    destination = make_onedrive(simple_upload_max=0)
    small, empty = make_source(1000), make_source(0)
    await destination.deliver(
        small.source, target(path="small.bin"), checkpoint=MemoryCheckpointStore()
    )
    await destination.deliver(
        empty.source, target(path="empty.bin"), checkpoint=MemoryCheckpointStore()
    )
    assert graph_server.sessions_created == 1 and graph_server.count("content") == 1
    assert graph_server.files()["small.bin"].sha256 == small.sha256
    assert graph_server.files()["empty.bin"].size == 0


async def test_other_drives(
    graph_server: GraphTestServer, make_onedrive: MakeOneDrive, make_source: MakeSource
) -> None:
    src = make_source(1000)
    fresh = MemoryCheckpointStore
    await make_onedrive(drive="users/alice@example.com").deliver(
        src.source, target(), checkpoint=fresh()
    )
    await make_onedrive().deliver(src.source, target(drive="drives/b!xyz"), checkpoint=fresh())
    per_owner = make_onedrive(drive="users/{owner}")
    await per_owner.deliver(src.source, target(owner="bob@example.com"), checkpoint=fresh())
    for drive in ("users/alice@example.com", "drives/b!xyz", "users/bob@example.com"):
        assert list(graph_server.files(drive)) == ["alice/2024-05-01/data.bin"], drive
    assert graph_server.files() == {}
    with pytest.raises(InvalidTarget):
        await per_owner.deliver(src.source, target(), checkpoint=fresh())
    with pytest.raises(InvalidTarget):
        await per_owner.deliver(src.source, target(owner="../me"), checkpoint=fresh())


async def test_manifest_is_uploaded_beside_the_file(
    graph_server: GraphTestServer, onedrive: OneDriveDestination, make_source: MakeSource
) -> None:
    src = make_source(5 * MiB)
    result = await onedrive.deliver(src.source, target(), checkpoint=MemoryCheckpointStore())
    manifest = Manifest.for_result(
        result,
        content_type="application/octet-stream",
        owner="alice",
        source={"upload": "upload-1"},
        metadata={"filename": "data.bin"},
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )
    path = await onedrive.write_manifest(result, manifest)
    assert path == "alice/2024-05-01/data.bin.manifest.json"
    body = json.loads(graph_server.read_bytes(path))
    assert body["sha256"] == src.sha256 and body["size"] == src.size and body["owner"] == "alice"
    assert body["item_id"] == result.item_id and body["metadata"] == {"filename": "data.bin"}
    assert body["created_at"] == "2024-05-01T12:00:00Z"


def test_settings_validation() -> None:
    OneDriveSettings(fragment_size=60 * MiB)
    with pytest.raises(ValueError, match="320 KiB"):
        OneDriveSettings(fragment_size=1 * MiB)
    with pytest.raises(ValueError, match="60 MiB"):
        OneDriveSettings(fragment_size=60 * MiB + 320 * 1024)
    with pytest.raises(ValueError, match="drive"):
        OneDriveSettings(drive="users/")
    with pytest.raises(ValueError, match="4 MiB"):
        OneDriveSettings(simple_upload_max=5 * MiB)
    assert OneDriveSettings().fragment_size == 10 * MiB


@pytest.mark.parametrize(
    ("selector", "path"),
    [
        ("me", "/me/drive"),
        ("b!abc", "/drives/b!abc"),
        ("drives/b!abc", "/drives/b!abc"),
        ("users/alice@example.com", "/users/alice@example.com/drive"),
        ("users/a b", "/users/a%20b/drive"),
        ("sites/contoso.sharepoint.com,1,2", "/sites/contoso.sharepoint.com,1,2/drive"),
    ],
)
def test_drive_selectors(selector: str, path: str) -> None:
    assert drive_path(selector) == path
