"""The transfers API (SPEC §3.4), gateway side: validation, status, listing, cancel, events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from events.bus import EventBus
from events.model import Event, TransferCanceled, TransferRequested, validate
from gateway.app import create_app
from gateway.settings import load_settings
from tests.gateway.conftest import create_upload, patch

GOOD = {
    "source": {"s3": {"bucket": "docs", "key": "a/report.pdf"}},
    "destination": {"onedrive": {"drive": "me", "path": "/Reports/report.pdf", "conflict": "rename"}},
    "description": "quarterly report",
}


@pytest.fixture
async def client(nats_url: str, aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    # No worker runs here: completing uploads must not wait for one.
    settings = load_settings(
        environ={},
        overrides={"data_dir": str(tmp_path / "data"), "nats_url": nats_url, "processing_enabled": False},
    )
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def seen(nats_url: str) -> Any:
    bus = EventBus(nats_url, name="observer")
    await bus.start(wait=5)
    events: list[Event] = []

    async def keep(event: Event) -> None:
        events.append(event)

    await bus.subscribe(["tusgate.transfer.>"], keep)
    yield events
    await bus.close()


async def test_create_answers_202_with_locations_and_emits_requested(client: TestClient[Any, Any], seen: list[Event]) -> None:
    resp = await client.post("/transfers", json=GOOD)
    assert resp.status == 202
    body = await resp.json()
    assert body["id"].startswith("tr_") and body["state"] == "requested"
    assert resp.headers["Location"] == f"/transfers/{body['id']}"
    assert resp.headers["Progress-Location"].endswith(f"/transfers/{body['id']}/progress")
    assert body["destination"]["onedrive"]["conflict"] == "rename"
    status = await (await client.get(resp.headers["Location"])).json()
    assert status["state"] == "requested" and status["percent"] == 0.0
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    event = seen[0]
    assert isinstance(event, TransferRequested) and event.transfer_id == body["id"]
    validate(event.to_envelope())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "source"),
        ({"source": {"s3": {"bucket": "b"}}, "destination": GOOD["destination"]}, "source.s3.key"),
        ({"source": {"ftp": "x"}, "destination": GOOD["destination"]}, "source.ftp"),
        ({"source": {"url": "file:///etc/passwd"}, "destination": GOOD["destination"]}, "source.url"),
        ({"source": {"s3": {"bucket": "b", "key": "k"}, "url": "http://x"}, "destination": GOOD["destination"]}, "source"),
        ({"source": GOOD["source"]}, "destination"),
        ({"source": GOOD["source"], "destination": {"onedrive": {"path": "/a/../../b"}}}, "destination.onedrive.path"),
        ({"source": GOOD["source"], "destination": {"onedrive": {"path": "/a", "conflict": "merge"}}}, "destination.onedrive.conflict"),
        ({"source": GOOD["source"], "destination": {"local": {}}}, "destination.local.path"),
        ({**GOOD, "delete_source": "yes"}, "delete_source"),
        ({**GOOD, "source": {"url": "https://x.example/a"}, "delete_source": True}, "delete_source"),
        ({**GOOD, "colour": "blue"}, "colour"),
        ({**GOOD, "source": {"upload": "../../etc"}}, "source.upload"),
        ({**GOOD, "source": {"upload": "0" * 32}}, "source.upload"),
        ([], "body"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(client: TestClient[Any, Any], body: Any, field: str) -> None:
    resp = await client.post("/transfers", json=body)
    assert resp.status == 400
    problem = await resp.json(content_type="application/problem+json")
    assert problem["field"] == field, problem
    assert "\n" not in problem["detail"]


async def test_not_json(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/transfers", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post("/transfers", data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    resp = await client.post("/transfers", data=b" " * 70_000, headers={"Content-Type": "application/json"})
    assert resp.status == 413


async def test_upload_source_must_be_complete(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 3)
    body = {**GOOD, "source": {"upload": path.rsplit("/", 1)[1]}}
    assert (await client.post("/transfers", json=body)).status == 400
    await patch(client, path, 0, b"abc")
    assert (await client.post("/transfers", json=body)).status == 202


async def test_cancel_is_idempotent(client: TestClient[Any, Any], seen: list[Event]) -> None:
    created = await (await client.post("/transfers", json=GOOD)).json()
    url = f"/transfers/{created['id']}"
    resp = await client.delete(url)
    assert resp.status == 202
    assert (await resp.json())["state"] == "canceled"
    resp = await client.delete(url)
    assert resp.status == 200
    assert (await (await client.get(url)).json())["state"] == "canceled"
    for _ in range(100):
        if any(isinstance(e, TransferCanceled) for e in seen):
            break
        await asyncio.sleep(0.05)
    assert [e.transfer_id for e in seen if isinstance(e, TransferCanceled)] == [created["id"]]


async def test_list_filters_by_state_and_limits(client: TestClient[Any, Any]) -> None:
    ids = [(await (await client.post("/transfers", json=GOOD)).json())["id"] for _ in range(3)]
    await client.delete(f"/transfers/{ids[0]}")
    listed = (await (await client.get("/transfers")).json())["transfers"]
    assert {t["id"] for t in listed} == set(ids)
    canceled = (await (await client.get("/transfers?state=canceled")).json())["transfers"]
    assert [t["id"] for t in canceled] == [ids[0]]
    assert len((await (await client.get("/transfers?limit=2")).json())["transfers"]) == 2
    assert (await client.get("/transfers?limit=0")).status == 400
    assert (await client.get("/transfers?state=bogus")).status == 400


async def test_unknown_transfer_is_404(client: TestClient[Any, Any]) -> None:
    for tid in ("tr_" + "0" * 32, "nope", "..%2F..%2Fetc"):
        assert (await client.get(f"/transfers/{tid}")).status == 404
        assert (await client.delete(f"/transfers/{tid}")).status == 404


async def test_without_nats_transfers_are_503(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "d")})
    client = await aiohttp_client(create_app(settings))
    assert (await client.post("/transfers", json=GOOD)).status == 503


async def test_openapi_document_is_served_valid_and_matches_docs(client: TestClient[Any, Any]) -> None:
    from openapi_spec_validator import validate as validate_spec

    served = await (await client.get("/openapi.json")).json()
    validate_spec(served)
    docs = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    assert served == json.loads(docs.read_text())
    assert {"/transfers", "/transfers/{transfer_id}", "/transfers/{transfer_id}/progress"} <= served["paths"].keys()
