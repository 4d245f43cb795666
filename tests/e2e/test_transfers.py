"""Server-side transfers end to end (SPEC §3.4, issue 6): `POST /transfers` on the gateway, a
real nats-server, the processing worker, moto's S3 server as the source, a local aiohttp
server for URL sources, and the Graph test server (or the local folder) as the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.exceptions import ClientError

from events.model import ProcessingAborted, ProcessingFinished
from gateway.app import create_app
from processing.config import worker_config
from tests.e2e.conftest import MakeSystem, System, sha256, wait_until
from tests.processing.worker_support import running_worker

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}
TERMINAL = ("succeeded", "failed", "canceled")

StartSystem = Callable[..., Awaitable[System]]


@pytest.fixture
async def start(make_system: MakeSystem, s3_server: str) -> AsyncIterator[StartSystem]:
    """A gateway + one worker reading S3 sources from moto, writing manifests. The worker
    reports progress every 0.2 s (instead of 1 s) so that short deliveries show several."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(destination: str = "onedrive", **overrides: Any) -> System:
            settings = {"s3_endpoint_url": s3_server, "destination_manifest": True, **overrides}
            system = await make_system(destination, worker=False, **settings)
            config = dataclasses.replace(
                worker_config(system.settings), fetch_timeout=0.2, progress_interval=0.2
            )
            worker = running_worker(system.settings, config=config)
            system.workers.append(await stack.enter_async_context(worker))
            return system

        yield start


@pytest.fixture
def s3(s3_server: str, s3_bucket: str) -> Any:
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    yield client
    client.close()


@dataclasses.dataclass
class Served:
    """What the local URL server sent."""

    requests: list[str] = dataclasses.field(default_factory=list)
    body_bytes_sent: dict[str, int] = dataclasses.field(default_factory=dict)


@pytest.fixture
async def url_server(tmp_path: Path) -> AsyncIterator[tuple[str, Served, bytes]]:
    """``/report.pdf`` (3 MiB, ranges, ETag: a FileResponse) and ``/huge.bin`` (declares
    64 MiB, then trickles it out 64 KiB at a time, counting what it managed to send)."""
    data = b"%PDF-1.7\n" + os.urandom(3 * MiB)
    path = tmp_path / "report.pdf"
    path.write_bytes(data)
    served = Served()

    async def report(request: web.Request) -> web.StreamResponse:
        served.requests.append(request.path)
        return web.FileResponse(path, headers={"Content-Type": "application/pdf"})

    async def huge(request: web.Request) -> web.StreamResponse:
        served.requests.append(request.path)
        total = 64 * MiB
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        chunk = bytes(64 * 1024)
        sent = 0
        try:
            while sent < total:
                await response.write(chunk)
                sent += len(chunk)
                served.body_bytes_sent[request.path] = sent
                await asyncio.sleep(0.005)
        except (ConnectionError, RuntimeError):
            pass  # the client went away: what it did not read was never downloaded
        return response

    app = web.Application()
    app.router.add_get("/report.pdf", report)
    app.router.add_get("/huge.bin", huge)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), served, data
    finally:
        await server.close()


async def create(system: System, body: dict[str, Any]) -> str:
    response = await system.client.post("/transfers", data=json.dumps(body), headers=JSON)
    assert response.status == 202, await response.text()
    transfer_id: str = (await response.json())["id"]
    assert response.headers["Location"] == f"/transfers/{transfer_id}"
    return transfer_id


async def transfer(system: System, transfer_id: str) -> dict[str, Any]:
    response = await system.client.get(f"/transfers/{transfer_id}")
    assert response.status == 200, await response.text()
    view: dict[str, Any] = await response.json()
    return view


async def wait_done(system: System, transfer_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = await transfer(system, transfer_id)
        if view["state"] in TERMINAL:
            return view
        assert time.monotonic() < deadline, f"{transfer_id} still {view['state']}: {view}"
        await asyncio.sleep(0.05)


def s3_body(bucket: str, key: str, **destination: Any) -> dict[str, Any]:
    return {"source": {"s3": {"bucket": bucket, "key": key}}, "destination": destination}


def object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey"), exc
        return False
    return True


async def test_an_s3_object_lands_in_onedrive_with_rising_progress_and_a_manifest(
    start: StartSystem, s3: Any, s3_bucket: str
) -> None:
    system = await start()
    system.graph.fragment_delay = 0.02  # 64 fragments of 320 KiB: about 1.5 s of delivery
    data = os.urandom(20 * MiB)
    s3.put_object(Bucket=s3_bucket, Key="in/report.pdf", Body=data, ContentType="application/pdf")
    destination = {"onedrive": {"path": "/Reports/Q1/report.pdf", "conflict": "fail"}}
    body = {**s3_body(s3_bucket, "in/report.pdf", **destination), "description": "Q1"}
    transfer_id = await create(system, body)
    statuses = await asyncio.wait_for(system.sse(f"/transfers/{transfer_id}"), 30)

    assert statuses[-1]["state"] == "succeeded", statuses[-1]
    finalizing = [
        s["processing"]["percent"]
        for s in statuses
        if s["state"] == "finalizing" and (s["processing"] or {}).get("percent") is not None
    ]
    assert len(set(finalizing)) >= 3 and finalizing == sorted(finalizing), finalizing
    assert statuses[-1]["processing"]["percent"] == 100.0

    stored = system.graph.files()["Reports/Q1/report.pdf"]
    assert stored.size == len(data) and stored.sha256 == sha256(data)
    assert system.graph.read_bytes("Reports/Q1/report.pdf") == data
    assert system.graph.open_sessions == 0
    view = await transfer(system, transfer_id)
    assert view["state"] == "succeeded" and view["percent"] == 100.0
    assert view["bytes_done"] == view["bytes_total"] == len(data)
    assert view["result"]["sha256"] == sha256(data) and view["result"]["size"] == len(data)
    assert view["result"]["destination"] == {
        "onedrive": {"drive": "me/drive", "path": "/Reports/Q1/report.pdf"}
    }
    assert view["started_at"] and view["finished_at"] and view["description"] == "Q1"
    # Not asked to: the source stays.
    assert object_exists(s3, s3_bucket, "in/report.pdf")

    manifest = json.loads(system.graph.read_bytes("Reports/Q1/report.pdf.manifest.json"))
    assert manifest["name"] == "report.pdf"
    assert manifest["size"] == len(data) and manifest["sha256"] == sha256(data)
    assert manifest["content_type"] == "application/pdf"
    assert manifest["source"] == {"s3": {"bucket": s3_bucket, "key": "in/report.pdf"}}
    assert manifest["owner"] == "anonymous" and manifest["item_id"] == stored.id
    created = datetime.fromisoformat(manifest["created_at"])
    delivered = datetime.fromisoformat(manifest["delivered_at"])
    assert created <= delivered
    assert abs((delivered - datetime.fromisoformat(view["finished_at"])).total_seconds()) < 5


async def test_a_url_lands_in_onedrive(
    start: StartSystem, url_server: tuple[str, Served, bytes]
) -> None:
    base, served, data = url_server
    # The test server is on loopback: allow exactly that address, nothing else private.
    system = await start(transfers_allow_networks="127.0.0.1/32")
    body = {
        "source": {"url": f"{base}/report.pdf?sig=secret"},
        "destination": {"onedrive": {"path": "/web/report.pdf"}},
    }
    transfer_id = await create(system, body)
    view = await wait_done(system, transfer_id)
    assert view["state"] == "succeeded", view
    assert system.graph.read_bytes("web/report.pdf") == data
    assert view["result"]["sha256"] == sha256(data)
    manifest = json.loads(system.graph.read_bytes("web/report.pdf.manifest.json"))
    assert manifest["content_type"] == "application/pdf" and manifest["size"] == len(data)
    assert manifest["source"] == {"url": f"{base}/report.pdf?sig=secret"}
    assert set(served.requests) == {"/report.pdf"}


async def test_cancel_during_a_slow_delivery_leaves_no_file_and_no_session(
    start: StartSystem, s3: Any, s3_bucket: str
) -> None:
    system = await start()
    system.graph.fragment_delay = 0.25  # 25 fragments: over 6 s of delivery
    s3.put_object(Bucket=s3_bucket, Key="big.bin", Body=os.urandom(8 * MiB))
    transfer_id = await create(system, s3_body(s3_bucket, "big.bin", onedrive={"path": "/big.bin"}))
    await wait_until(lambda: system.graph.count("fragment") >= 2, 10, "fragments arriving")

    response = await system.client.delete(f"/transfers/{transfer_id}")
    assert response.status == 202 and (await response.json())["state"] == "canceled"
    again = await system.client.delete(f"/transfers/{transfer_id}")  # idempotent
    assert again.status == 200 and (await again.json())["state"] == "canceled"

    # The running delivery notices at its next heartbeat and deletes its upload session.
    await wait_until(lambda: system.graph.open_sessions == 0, 10, "the session deleted")
    fragments = system.graph.count("fragment")
    await asyncio.sleep(1.0)
    assert system.graph.count("fragment") <= fragments + 1  # at most one was in flight
    assert system.graph.files() == {}
    assert system.graph.open_sessions == 0
    view = await transfer(system, transfer_id)
    assert view["state"] == "canceled" and view["finished_at"]
    outcome = await system.log.wait_outcome(transfer_id)
    assert isinstance(outcome, ProcessingAborted) and outcome.code == "canceled"


async def test_sources_that_cannot_be_read_fail_with_a_precise_code(
    start: StartSystem, s3_bucket: str, url_server: tuple[str, Served, bytes]
) -> None:
    base, served, _ = url_server
    system = await start(transfers_allow_networks="127.0.0.1/32", transfers_max_size=16 * MiB)
    missing = await create(system, s3_body(s3_bucket, "no/such.pdf", onedrive={"path": "/a.pdf"}))
    huge = await create(
        system, {"source": {"url": f"{base}/huge.bin"}, "destination": {"onedrive": {"path": "/h"}}}
    )
    for transfer_id, code in ((missing, "source_not_found"), (huge, "too_large")):
        view = await wait_done(system, transfer_id)
        assert view["state"] == "failed", view
        assert view["error"]["code"] == code and view["error"]["retryable"] is False, view
        outcome = await system.log.wait_outcome(transfer_id)
        assert isinstance(outcome, ProcessingAborted) and outcome.code == code
    assert "no/such.pdf" in (await transfer(system, missing))["error"]["message"]
    # Refused on its Content-Length: of 64 MiB declared, the body was never downloaded (what
    # was sent went into socket buffers before the connection was dropped).
    await asyncio.sleep(0.2)
    assert served.requests == ["/huge.bin"]
    assert served.body_bytes_sent.get("/huge.bin", 0) < 8 * MiB, served.body_bytes_sent
    assert not list((system.settings.data_dir / "spool").glob("*"))
    assert system.graph.files() == {} and system.graph.sessions_created == 0


async def test_a_url_on_a_private_address_is_refused(
    start: StartSystem, url_server: tuple[str, Served, bytes]
) -> None:
    base, served, _ = url_server
    system = await start()  # transfers_allow_private / _allow_networks left at their defaults
    transfer_id = await create(
        system,
        {"source": {"url": f"{base}/report.pdf"}, "destination": {"onedrive": {"path": "/r.pdf"}}},
    )
    view = await wait_done(system, transfer_id)
    assert view["state"] == "failed" and view["error"]["code"] == "address_not_allowed", view
    assert "127.0.0.1" in view["error"]["message"]
    assert served.requests == []  # no connection was made
    assert system.graph.files() == {}


async def test_delete_source_removes_the_object_after_success_only(
    start: StartSystem, s3: Any, s3_bucket: str
) -> None:
    system = await start(destination_manifest=False)
    system.graph.put_file("taken.bin", b"already here")
    for key in ("done.bin", "kept.bin"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=os.urandom(MiB))
    done = await create(
        system,
        {**s3_body(s3_bucket, "done.bin", onedrive={"path": "/done.bin"}), "delete_source": True},
    )
    kept = await create(
        system,
        {
            **s3_body(s3_bucket, "kept.bin", onedrive={"path": "/taken.bin", "conflict": "fail"}),
            "delete_source": True,
        },
    )
    assert (await wait_done(system, done))["state"] == "succeeded"
    failed = await wait_done(system, kept)
    assert failed["state"] == "failed" and failed["error"]["code"] == "conflict", failed
    await wait_until(lambda: not object_exists(s3, s3_bucket, "done.bin"), 10, "done.bin deleted")
    assert "done.bin" in system.graph.files()
    await asyncio.sleep(0.5)  # a sweep runs every 0.2 s: it must not touch the failed one
    assert object_exists(s3, s3_bucket, "kept.bin")
    assert await _cleanups(system) == []


async def _cleanups(system: System) -> list[str]:
    """Clean-up deadlines left in the worker's ledger (none once done)."""
    from processing.checkpoints_kv import open_bucket
    from processing.ledger import Ledger

    ledger = Ledger(await open_bucket(system.bus.js))
    return [c.upload_id for c in await ledger.cleanups()]


async def test_a_transfer_to_a_local_folder(start: StartSystem, s3: Any, s3_bucket: str) -> None:
    system = await start("local")
    data = os.urandom(5 * MiB + 3)
    s3.put_object(Bucket=s3_bucket, Key="deep/in/the/bucket.csv", Body=data, ContentType="text/csv")
    transfer_id = await create(
        system, s3_body(s3_bucket, "deep/in/the/bucket.csv", local={"path": "/imports/b.csv"})
    )
    view = await wait_done(system, transfer_id)
    assert view["state"] == "succeeded", view
    delivered = system.settings.delivered_dir / "imports" / "b.csv"
    assert delivered.read_bytes() == data
    assert view["result"]["destination"] == {"local": {"path": "imports/b.csv"}}
    manifest = json.loads((delivered.parent / "b.csv.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["content_type"] == "text/csv" and manifest["name"] == "b.csv"
    assert system.delivered_files() == [delivered, delivered.parent / "b.csv.manifest.json"]


async def test_any_gateway_instance_sees_status_and_events(
    start: StartSystem, aiohttp_client: Any, s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    first = await start()
    # Another gateway instance: the same NATS, a disk of its own (another machine).
    settings = first.settings.replace(data_dir=tmp_path / "second")
    client = await aiohttp_client(create_app(settings))
    second = System(client, settings, first.log, first.bus, first.graph)
    first.graph.fragment_delay = 0.05
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=s3_bucket, Key="shared.bin", Body=data)
    transfer_id = await create(first, s3_body(s3_bucket, "shared.bin", onedrive={"path": "/s.bin"}))

    early = await transfer(second, transfer_id)  # the status is written before the 202
    assert early["state"] in ("requested", "processing", "finalizing"), early
    statuses = await asyncio.wait_for(second.sse(f"/transfers/{transfer_id}"), 20)
    assert statuses[-1]["state"] == "succeeded"
    assert statuses[-1]["result"]["sha256"] == sha256(data)
    assert {"finalizing", "succeeded"} <= {s["state"] for s in statuses}
    listed = await (await second.client.get("/transfers?state=succeeded")).json()
    assert [t["id"] for t in listed["transfers"]] == [transfer_id]
    assert (await transfer(second, transfer_id))["state"] == "succeeded"
    outcome = first.log.outcome(transfer_id)
    assert isinstance(outcome, ProcessingFinished) and outcome.sha256 == sha256(data)
