"""Uploads end to end into (test) OneDrive: TUS in, one identical file out, whatever happens."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from events.bus import STREAM_NAME
from events.model import ProcessingFinished, ProcessingStarted, UploadBytesReceived
from gateway.settings import Settings
from processing.worker import CONSUMER
from tests.e2e.conftest import MakeSystem, System, WorkerProcess, metadata, sha256, wait_until
from tests.graph_server import Fault
from tests.processing.worker_support import running_worker

MiB = 1024 * 1024


def today() -> str:
    return datetime.now(UTC).date().isoformat()


async def assert_one_file(system: System, path: str, name: str, data: bytes) -> None:
    files = system.graph.files()
    assert list(files) == [f"anonymous/{today()}/{name}"], files
    stored = files[f"anonymous/{today()}/{name}"]
    assert stored.size == len(data) and stored.sha256 == sha256(data)
    assert system.graph.read_bytes(stored.path) == data
    # The status projection follows the outcome event by a few milliseconds.
    status = await system.wait_state(path, "succeeded", timeout=5)
    result = status["result"]
    assert result["sha256"] == sha256(data) and result["size"] == len(data)
    assert result["item_id"] == stored.id
    assert result["destination"] == {
        "onedrive": {"drive": "me/drive", "path": f"/anonymous/{today()}/{name}"}
    }


@pytest.mark.parametrize(
    "size", [0, 1 * MiB, 4 * MiB + 1], ids=["empty", "1MiB-simple", "4MiB+1-session"]
)
async def test_an_upload_lands_in_onedrive_unchanged(make_system: MakeSystem, size: int) -> None:
    system = await make_system()
    data = os.urandom(size)
    path, response = await system.upload(data, filename="photo.raw")
    assert response.status == (201 if size == 0 else 204), await response.text()
    await assert_one_file(system, path, "photo.raw", data)
    if size > 4 * MiB:
        assert system.graph.sessions_created == 1 and system.graph.open_sessions == 0
        assert not any(r.authorization for r in system.graph.requests if r.operation == "fragment")
    # The staged bytes are discarded after delivery (store_retention 0): 410 Gone.
    for _ in range(100):
        if (await system.client.get(path)).status == 410:
            break
        await asyncio.sleep(0.05)
    assert (await system.client.get(path)).status == 410


async def test_respond_async_progress_goes_processing_finalizing_succeeded(
    make_system: MakeSystem,
) -> None:
    system = await make_system(graph_fragment_size=3 * 320 * 1024)
    system.graph.fragment_delay = 0.4  # ~3 s of delivery: several progress events
    data = os.urandom(6 * MiB)
    digest = "sha256 " + sha256(data)
    create = await system.client.post(
        "/files/",
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Length": str(len(data)),
            "Upload-Metadata": metadata(filename="big.bin", checksum=digest),
        },
    )
    path = "/files/" + create.headers["Location"].rsplit("/", 1)[1]
    stream = asyncio.create_task(system.sse(path))  # watching from before the last byte
    await asyncio.sleep(0.2)
    response = await system.patch(path, data, prefer_async=True)
    assert response.status == 202
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.headers["Progress-Location"].endswith(path + "/progress")
    statuses = await asyncio.wait_for(stream, 30)
    states = [s["state"] for s in statuses]
    order = ["receiving", "received", "processing", "finalizing", "succeeded"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states), states
    assert {"processing", "finalizing", "succeeded"} <= set(states), states
    finalizing = [
        s["processing"]["percent"]
        for s in statuses
        if s["state"] == "finalizing"
        and s["processing"]
        and s["processing"].get("percent") is not None
    ]
    assert len(set(finalizing)) >= 2 and finalizing == sorted(finalizing), finalizing
    assert statuses[-1]["processing"]["percent"] == 100.0
    assert statuses[-1]["result"]["sha256"] == sha256(data)


async def test_throttling_errors_and_dropped_connections_still_give_one_file(
    make_system: MakeSystem,
) -> None:
    system = await make_system()
    graph = system.graph
    graph.fail("create", 429, retry_after=1)
    graph.fail("create", 503)
    graph.fail("fragment", 503, retry_after=0, nth=2)
    graph.fail("fragment", 429, retry_after=1, nth=4)
    graph.drop("fragment", after_bytes=100_000, nth=6)  # cut mid-body: bytes ignored
    graph.drop("fragment", response=True, nth=9)  # stored, but the answer is lost
    graph.fail("status", 503)
    data = os.urandom(4 * MiB + 1)
    path, response = await system.upload(data, filename="faults.bin")
    assert response.status == 204, await response.text()
    await assert_one_file(system, path, "faults.bin", data)
    assert graph.pending_faults == 0
    assert graph.sessions_created == 1


async def test_simple_upload_faults_still_give_one_file(make_system: MakeSystem) -> None:
    system = await make_system()
    system.graph.fail("content", 503, retry_after=0)
    system.graph.drop("content", after_bytes=1000)
    system.graph.drop("content", response=True)  # stored, answer lost: retried as a replace
    data = os.urandom(200_000)
    path, response = await system.upload(data, filename="small.bin")
    assert response.status == 204
    await assert_one_file(system, path, "small.bin", data)


async def test_the_same_event_delivered_twice_gives_one_file(make_system: MakeSystem) -> None:
    system = await make_system()
    data = os.urandom(4 * MiB + 1)
    path, response = await system.upload(data, filename="twice.bin")
    assert response.status == 204
    upload_id = path.rsplit("/", 1)[1]
    [event] = system.log.of(UploadBytesReceived)
    requests = len(system.graph.requests)
    # Published again under another Nats-Msg-Id: JetStream cannot drop it as a duplicate.
    await system.bus.publish_raw(
        event.nats_subject, event.to_json_bytes(), msg_id=event.msg_id + ":again"
    )

    async def settled() -> bool:
        info = await system.bus.js.consumer_info(STREAM_NAME, CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.05)
    assert await settled()
    await assert_one_file(system, path, "twice.bin", data)
    assert len(system.graph.requests) == requests  # not even a look at Graph
    assert len(system.log.of(ProcessingStarted, upload_id)) == 1
    # The recorded outcome was published again, under the same id (the stream keeps one).
    finished = system.log.of(ProcessingFinished, upload_id)
    assert len(finished) == 2 and finished[0].event_id == finished[1].event_id


async def test_a_worker_killed_mid_delivery_is_resumed_by_another(
    make_system: MakeSystem, spawn_worker: Callable[[Settings], WorkerProcess]
) -> None:
    system = await make_system(worker=False, processing_ack_wait=2.0)
    graph = system.graph
    graph.fragment_delay = 0.1
    killed = spawn_worker(system.settings)
    data = os.urandom(8 * MiB)  # 26 fragments of 320 KiB, ~3 s
    path, response = await system.upload(data, prefer_async=True, filename="survivor.bin")
    assert response.status == 202
    await wait_until(lambda: graph.count("fragment") >= 6, 20, "fragments arriving")
    killed.kill()
    sent_before = graph.count("fragment")
    graph.fragment_delay = 0.0
    async with running_worker(system.settings):
        status = await system.wait_state(path, "succeeded", timeout=30)
    upload_id = path.rsplit("/", 1)[1]
    assert [e.attempt for e in system.log.of(ProcessingStarted, upload_id)] == [1, 2]
    assert graph.sessions_created == 1, "the second worker must resume the same session"
    await assert_one_file(system, path, "survivor.bin", data)
    assert status["result"]["sha256"] == sha256(data)
    # It resumed where the first one stopped instead of sending everything again.
    assert graph.count("fragment") - sent_before <= 26 - 6 + 2


async def test_a_fault_injected_delivery_keeps_the_session(make_system: MakeSystem) -> None:
    """A session whose uploadUrl expired mid-way is replaced; still one file."""
    system = await make_system()
    system.graph.inject("fragment", Fault(status=404), nth=3)
    data = os.urandom(4 * MiB + 3 * 320 * 1024)
    path, response = await system.upload(data, filename="restart.bin")
    assert response.status == 204
    await assert_one_file(system, path, "restart.bin", data)
    assert system.graph.sessions_created == 2 and system.graph.open_sessions <= 1
