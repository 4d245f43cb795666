"""The completion contract (SPEC §3.2) and live status (§3.3) with a real nats-server.

Until the processing service answers, a small test subscriber plays it over the real NATS:
it answers upload.bytes-received with processing.* events, aborting when the upload's metadata
says `outcome abort`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from events.bus import EventBus
from events.model import (
    Event,
    ProcessingAborted,
    ProcessingFinished,
    ProcessingProgress,
    ProcessingStarted,
    UploadBytesReceived,
    validate,
)
from gateway.app import create_app
from gateway.settings import load_settings
from tests.gateway.conftest import OCTET, create_upload, patch

ABORT = "outcome YWJvcnQ="  # outcome=abort


class FakeProcessor:
    """Answers bytes-received like a worker would, over the real NATS."""

    def __init__(self, bus: EventBus, *, delay: float = 0.0) -> None:
        self.bus = bus
        self.delay = delay
        self.seen: list[UploadBytesReceived] = []

    async def start(self) -> None:
        await self.bus.subscribe(UploadBytesReceived.event_type(), self.on_event)

    async def on_event(self, event: Event) -> None:
        assert isinstance(event, UploadBytesReceived)
        self.seen.append(event)
        uid = event.upload_id
        await self.bus.publish(ProcessingStarted(id=uid, kind="upload", attempt=1, worker="test"))
        for step, pct in (("processing", 50.0), ("finalizing", 30.0), ("finalizing", 90.0)):
            await asyncio.sleep(self.delay)
            await self.bus.publish(
                ProcessingProgress(id=uid, step=step, bytes_done=int(event.size * pct / 100),  # type: ignore[arg-type]
                                   bytes_total=event.size, percent=pct)
            )
        if event.metadata.get("outcome") == "abort":
            await self.bus.publish(ProcessingAborted(id=uid, code="rejected_by_test", message="the test said no", retryable=False))
        else:
            await self.bus.publish(ProcessingFinished(
                id=uid, destination={"local": {"path": "/x"}}, item_id="i1", web_url=None,
                size=event.size, sha256=event.checksums.get("sha256", ""),
            ))


@pytest.fixture
async def processor(nats_url: str) -> AsyncIterator[FakeProcessor]:
    bus = EventBus(nats_url, name="fake-processor")
    await bus.start(wait=5)
    proc = FakeProcessor(bus, delay=0.05)
    await proc.start()
    yield proc
    await bus.close()


async def events_client(aiohttp_client: Any, tmp_path: Path, nats_url: str, **overrides: Any) -> TestClient[Any, Any]:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data"), "nats_url": nats_url})
    return await aiohttp_client(create_app(settings.replace(**overrides)))


async def test_finished_gives_204_and_bytes_received_is_complete(
    nats_url: str, aiohttp_client: Any, tmp_path: Path, processor: FakeProcessor
) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url, processing_wait=10.0)
    path = await create_upload(client, 11, **{"Upload-Metadata": "filename YS50eHQ=,filetype dGV4dC9wbGFpbg=="})
    resp = await patch(client, path, 0, b"hello world")
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == "11"
    event = processor.seen[-1]
    validate(event.to_envelope())
    assert event.size == 11 and event.filename == "a.txt" and event.content_type == "text/plain"
    assert event.checksums["sha256"] == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert event.owner == "anonymous"


async def test_aborted_gives_422_problem(
    nats_url: str, aiohttp_client: Any, tmp_path: Path, processor: FakeProcessor
) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url, processing_wait=10.0)
    path = await create_upload(client, 3, **{"Upload-Metadata": ABORT})
    resp = await patch(client, path, 0, b"abc")
    assert resp.status == 422
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Upload-Offset"] == "3" and resp.headers["Tus-Resumable"] == "1.0.0"
    body = await resp.json(content_type="application/problem+json")
    assert body["code"] == "rejected_by_test"
    assert body["upload_id"] == path.rsplit("/", 1)[1]
    assert {"type", "title", "detail"} <= body.keys()


async def test_post_with_whole_body_waits_and_answers_201(
    nats_url: str, aiohttp_client: Any, tmp_path: Path, processor: FakeProcessor
) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url, processing_wait=10.0)
    resp = await client.post("/files/", data=b"abc", headers={**OCTET, "Upload-Length": "3", "Upload-Metadata": ABORT})
    assert resp.status == 422
    resp = await client.post("/files/", data=b"abc", headers={**OCTET, "Upload-Length": "3"})
    assert resp.status == 201 and "Location" in resp.headers


async def test_processing_disabled_answers_at_once(nats_url: str, aiohttp_client: Any, tmp_path: Path) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url, processing_enabled=False, processing_wait=30.0)
    path = await create_upload(client, 3)
    resp = await asyncio.wait_for(patch(client, path, 0, b"abc"), 10)
    assert resp.status == 204


async def test_no_outcome_in_time_gives_202(nats_url: str, aiohttp_client: Any, tmp_path: Path) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url, processing_wait=0.3)
    path = await create_upload(client, 3)
    resp = await patch(client, path, 0, b"abc")
    assert resp.status == 202
    assert resp.headers["Progress-Location"].endswith(path + "/progress")


async def read_sse(client: TestClient[Any, Any], url: str) -> list[dict[str, Any]]:
    statuses = []
    async with client.session.get(url, timeout=None) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                statuses.append(json.loads(line[6:]))
    return statuses


async def test_respond_async_202_and_progress_stream(
    nats_url: str, aiohttp_client: Any, tmp_path: Path, processor: FakeProcessor
) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url)
    path = await create_upload(client, 5)
    resp = await patch(client, path, 0, b"hello", Prefer="respond-async")
    assert resp.status == 202
    assert resp.headers["Preference-Applied"] == "respond-async"
    progress = resp.headers["Progress-Location"]
    assert progress.startswith("http://") and progress.endswith(path + "/progress")
    statuses = await asyncio.wait_for(read_sse(client, progress), 20)
    states = [s["state"] for s in statuses]
    assert states[-1] == "succeeded"
    ranks = ["receiving", "received", "processing", "finalizing", "succeeded"]
    assert [ranks.index(s) for s in states] == sorted(ranks.index(s) for s in states)  # in order
    assert statuses[-1]["result"]["sha256"]
    status = await (await client.get(path + "/status")).json()
    assert status["state"] == "succeeded" and status["offset"] == 5 and status["length"] == 5


async def test_websocket_progress(
    nats_url: str, aiohttp_client: Any, tmp_path: Path, processor: FakeProcessor
) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url)
    path = await create_upload(client, 3, **{"Upload-Metadata": ABORT})
    ws = await client.ws_connect(path + "/progress")
    resp = await patch(client, path, 0, b"abc", Prefer="respond-async")
    assert resp.status == 202
    states = []
    async def collect() -> None:
        async for msg in ws:
            states.append(json.loads(msg.data))
    await asyncio.wait_for(collect(), 20)
    assert states[0]["state"] == "receiving"
    assert states[-1]["state"] == "failed"
    assert states[-1]["error"]["code"] == "rejected_by_test"
    assert ws.closed


async def test_status_unknown_is_404(nats_url: str, aiohttp_client: Any, tmp_path: Path) -> None:
    client = await events_client(aiohttp_client, tmp_path, nats_url)
    assert (await client.get("/files/" + "0" * 32 + "/status")).status == 404
    assert (await client.get("/files/..%2Fx/status")).status == 404
